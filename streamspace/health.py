"""Liveness and readiness probes.

``/healthz``: the process answers. ``/readyz``: this process can serve (the database and
the channel layer answer); each failed check names its reason, and the answer is 503
while any fails. Load balancers read it, so it does not depend on Celery: a dead beat
must not take every Daphne out of service. ``/healthz/sweeps``: the periodic sweeps
(Celery beat + worker) have run recently, 503 with the reason otherwise; for monitoring,
and the same check as ``manage.py check_sweeps`` (the beat Deployment's liveness probe).
``/readyz`` shows the sweeps' state too, without letting it decide."""

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse

from agents_app.sweep_runs import sweeps_overdue
from streamspace.celery import sweep_periods


def healthz(request):
    return JsonResponse({"status": "ok"})


def readyz(request):
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        # A publish to a channel nobody listens on: reaches Redis without subscribing
        # (a new_channel per probe would leave one subscription behind each time).
        async_to_sync(get_channel_layer().send)("readyz.probe", {"type": "readyz.ping"})
        checks["channel_layer"] = "ok"
    except ChannelFull:  # the in-memory layer keeps unread probes for a minute: it answered
        checks["channel_layer"] = "ok"
    except Exception as exc:
        checks["channel_layer"] = f"error: {exc.__class__.__name__}"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    body["sweeps"] = sweeps_check() if checks["database"] == "ok" else "unknown: the database is unavailable"
    return JsonResponse(body, status=200 if ok else 503)


def sweeps_check() -> str:
    """ "ok", or "error: <which sweeps are overdue>" (reads the database)."""
    overdue = sweeps_overdue(sweep_periods())
    return f"error: {'; '.join(overdue)} (is Celery beat running?)" if overdue else "ok"


def sweeps(request):
    try:
        state = sweeps_check()
    except Exception as exc:
        state = f"unknown: the database is unavailable ({exc.__class__.__name__})"
    ok = state == "ok"
    return JsonResponse({"status": "ok" if ok else "unavailable", "sweeps": state}, status=200 if ok else 503)
