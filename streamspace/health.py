"""Liveness and readiness probes.

``/healthz``: the process answers. ``/readyz``: the database and the channel layer
answer, and the periodic sweeps (Celery beat + worker) have run recently; each failed
check names its reason, and the answer is 503 while any fails."""

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
    if checks["database"] == "ok":
        overdue = sweeps_overdue(sweep_periods())
        checks["sweeps"] = f"error: {'; '.join(overdue)} (is Celery beat running?)" if overdue else "ok"
    else:
        checks["sweeps"] = "unknown: the database is unavailable"
    ok = all(v == "ok" for v in checks.values())
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)
