"""Prometheus metrics at ``/metrics``, computed from the database at scrape time.

Every series is derived from durable rows by a few GROUP BY queries in one custom
collector: state gauges (agents, sessions, open viewer connections, idle sessions) from
the current rows, and event counters and histograms from the rows each event leaves
behind (an ``AgentCommand``'s timestamps, a session's ``started_at``, ``SweepRun``'s
totals, a ``VNCConnection``'s byte counts and ``tunnel_ready_at``). So the numbers are
the same from every Daphne process on every host, whichever process (or the Celery
worker) saw the event, and a counter never goes back when a process restarts. It can go
back when its rows change: a late answer turns a ``timed_out``/``failed`` command into
``completed`` (one outcome down, another up), and deleting an agent or a session deletes
its commands and connections; Prometheus reads a drop as a counter reset (README).
docs/ARCHITECTURE.md ("Metrics") says why this and not multiprocess mode or Redis.

Protected by a bearer token from ``METRICS_TOKEN``; with none configured the endpoint
is disabled (403)."""

from __future__ import annotations

import hmac
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agents_app.models import Agent, AgentCommand, SweepRun
from sessions_app.models import Session, Template
from sessions_app.states import State
from streamspace.database_outage import DATABASE_ERRORS
from vnc_app.models import VNCConnection

# Bucket upper bounds (seconds) of each histogram; +Inf is added.
COMMAND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CREATE_TO_RUNNING_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TUNNEL_OPEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

FINISHED_COMMANDS = (AgentCommand.Status.COMPLETED, AgentCommand.Status.FAILED, AgentCommand.Status.TIMED_OUT)


def _seconds(value) -> float:
    return value.total_seconds() if value is not None else 0.0


def _histogram_rows(queryset, start: str, end: str, buckets, group_by: tuple[str, ...]):
    """(group values, cumulative bucket counts, sum of seconds, count) per group, from rows
    whose ``end`` is set: the duration is ``end - start``."""
    duration = ExpressionWrapper(F(end) - F(start), output_field=DurationField())
    aggregates = {f"le{i}": Count("pk", filter=Q(d__lte=timedelta(seconds=b))) for i, b in enumerate(buckets)}
    observed = queryset.filter(**{f"{end}__isnull": False}).annotate(d=duration)
    totals = {"n": Count("pk"), "total": Sum("d"), **aggregates}
    if group_by:
        rows = observed.values(*group_by).annotate(**totals).order_by(*group_by)
    else:  # one row (values() without fields would group by every column)
        rows = [observed.aggregate(**totals)]
    for row in rows:
        counts = [row[f"le{i}"] for i in range(len(buckets))]
        yield tuple(row[g] for g in group_by), counts, _seconds(row["total"]), row["n"]


def _histogram(name: str, documentation: str, labels: list[str], rows, buckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, counts, total, n in rows:
        family.add_metric(
            list(values), [(floatToGoString(b), c) for b, c in zip(buckets, counts, strict=True)] + [("+Inf", n)], total
        )
    return family


class DatabaseCollector(Collector):
    """Every ``streamspace_*`` series, read from the database on each scrape."""

    def collect(self):
        yield from self._agents()
        yield from self._sessions()
        yield from self._commands()
        yield from self._sweeps()
        yield from self._viewers()

    def _agents(self):
        agents = GaugeMetricFamily(
            "streamspace_agents", "Agents by status and platform.", labels=["status", "platform"]
        )
        found = {
            (r["status"], r["platform"]): r["n"]
            for r in Agent.objects.values("status", "platform").annotate(n=Count("pk")).order_by()
        }
        for status in Agent.Status.values:
            for platform in Agent.Platform.values:
                agents.add_metric([status, platform], found.pop((status, platform), 0))
        for (status, platform), n in sorted(found.items()):  # values outside the choices, if any
            agents.add_metric([status, platform], n)
        yield agents

    def _sessions(self):
        sessions = GaugeMetricFamily(
            "streamspace_sessions", "Sessions by state and template.", labels=["state", "template"]
        )
        slugs = dict(Template.objects.values_list("pk", "slug"))  # a few rows: cheaper than a join
        rows = Session.objects.values("state", "template_id").annotate(n=Count("pk")).order_by()
        running = 0
        for row in sorted(rows, key=lambda r: (slugs.get(r["template_id"], ""), r["state"])):
            sessions.add_metric([row["state"], slugs.get(row["template_id"], "")], row["n"])
            running += row["n"] if row["state"] == State.RUNNING else 0
        yield sessions
        watched = (
            VNCConnection.objects.filter(closed_at__isnull=True, stream="vnc", session__state=State.RUNNING)
            .values("session_id")
            .distinct()
            .count()
        )
        yield GaugeMetricFamily(
            "streamspace_sessions_idle", "Running sessions with no viewer connected.", value=running - watched
        )
        yield _histogram(
            "streamspace_session_create_to_running_seconds",
            "Time from a session's creation to its first running state.",
            [],
            _histogram_rows(Session.objects.all(), "created_at", "started_at", CREATE_TO_RUNNING_BUCKETS, ()),
            CREATE_TO_RUNNING_BUCKETS,
        )

    def _commands(self):
        rows = list(
            _histogram_rows(
                AgentCommand.objects.filter(status__in=FINISHED_COMMANDS),
                "created_at",
                "completed_at",
                COMMAND_BUCKETS,
                ("type", "status"),
            )
        )
        total = CounterMetricFamily(
            "streamspace_commands", "Finished agent commands by type and outcome.", labels=["type", "outcome"]
        )
        for (kind, outcome), _, _, n in rows:
            total.add_metric([kind, outcome], n)
        yield total
        yield _histogram(
            "streamspace_command_duration_seconds",
            "Agent commands from queued to finished, by type and outcome.",
            ["type", "outcome"],
            rows,
            COMMAND_BUCKETS,
        )

    def _sweeps(self):
        runs = CounterMetricFamily("streamspace_sweep_runs", "Finished runs of each periodic sweep.", labels=["sweep"])
        changes = CounterMetricFamily(
            "streamspace_sweep_changes", "What the sweeps changed, by sweep and kind.", labels=["sweep", "change"]
        )
        for run in SweepRun.objects.order_by("name"):
            sweep = run.name.rsplit(".", 1)[-1]
            runs.add_metric([sweep], run.runs)
            for kind, count in sorted(run.changes.items()):
                changes.add_metric([sweep, kind], count)
        yield runs
        yield changes

    def _viewers(self):
        totals = VNCConnection.objects.aggregate(
            open=Count("pk", filter=Q(closed_at__isnull=True, stream="vnc")),  # the sound socket is no viewer
            to_client=Sum("bytes_to_client", filter=Q(closed_at__isnull=False)),
            from_client=Sum("bytes_from_client", filter=Q(closed_at__isnull=False)),
        )
        yield GaugeMetricFamily(
            "streamspace_viewer_connections_open", "Open viewer (VNC) connections.", value=totals["open"]
        )
        relay = CounterMetricFamily(
            "streamspace_relay_bytes",
            "Bytes relayed between viewers and desktops, by direction; counted when the viewer connection closes.",
            labels=["direction"],
        )
        relay.add_metric(["to_viewer"], totals["to_client"] or 0)
        relay.add_metric(["from_viewer"], totals["from_client"] or 0)
        yield relay
        yield _histogram(
            "streamspace_tunnel_open_seconds",
            "Time from a viewer connecting to the agent reporting its tunnel open.",
            [],
            _histogram_rows(VNCConnection.objects.all(), "opened_at", "tunnel_ready_at", TUNNEL_OPEN_BUCKETS, ()),
            TUNNEL_OPEN_BUCKETS,
        )


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(DatabaseCollector())


def _refuse(status: int, code: str, detail: str) -> JsonResponse:
    response = JsonResponse({"error": code, "detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_GET
def metrics(request):
    token = settings.METRICS_TOKEN
    if not token:
        return _refuse(403, "metrics_disabled", "/metrics is disabled: set METRICS_TOKEN to enable it")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _refuse(401, "not_authenticated", "send Authorization: Bearer <METRICS_TOKEN>")
    try:
        body = generate_latest(REGISTRY)
    except DATABASE_ERRORS:
        return _refuse(503, "database_unavailable", "the metrics come from the database, which is unavailable")
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
