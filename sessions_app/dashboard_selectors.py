"""Reads for the staff dashboard. Every function runs a fixed number of queries whatever
the number of agents or sessions: counts and sums are aggregates in the database, tables
are one page of rows with their related rows joined (select_related) and their figures
annotated, never a query per row (tests/portal/test_dashboard.py counts them)."""

from __future__ import annotations

from datetime import timedelta

from django.core.paginator import Paginator
from django.db.models import (
    BooleanField,
    Count,
    ExpressionWrapper,
    F,
    FloatField,
    IntegerField,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Cast, Coalesce
from django.utils import timezone

from agents_app.models import Agent, AgentCommand
from agents_app.selectors import _capacity, agent_liveness_cutoff
from sessions_app.limits import charged_cpu, charged_memory
from sessions_app.models import Session, SessionEvent
from sessions_app.states import CONSUMING_STATES, LIVE_STATES, State
from vnc_app.models import VNCConnection

PAGE_SIZE = 50
TIMELINE_LIMIT = 200  # of each kind (state changes, commands, viewer connections)
RECENT_COMMANDS = 50


def _online(prefix: str = "") -> Q:
    """An agent that reports: online or draining, with a heartbeat inside the liveness window."""
    return Q(**{f"{prefix}status__in": (Agent.Status.ONLINE, Agent.Status.DRAINING)}) & Q(
        **{f"{prefix}last_heartbeat__gte": agent_liveness_cutoff()}
    )


def dashboard_summary() -> dict:
    """The summary cards, in four queries: agents, sessions by state, active users and open
    viewers, and CPU/memory reserved against capacity per platform."""
    agents = Agent.objects.aggregate(total=Count("id"), online=Count("id", filter=_online()))
    by_state = dict(Session.objects.values_list("state").annotate(n=Count("id")).order_by())
    users = Session.objects.filter(state__in=CONSUMING_STATES).aggregate(active=Count("owner", distinct=True))
    viewers = VNCConnection.objects.filter(closed_at__isnull=True, stream="vnc").count()  # not the sound sockets
    return {
        "agents_total": agents["total"],
        "agents_online": agents["online"],
        "sessions_by_state": [(state, by_state.get(state, 0)) for state in State.ALL],
        "sessions_live": sum(n for state, n in by_state.items() if state in LIVE_STATES),
        "users_active": users["active"],
        "viewers_open": viewers,
        "platforms": platform_capacity(),
    }


def platform_capacity() -> list[dict]:
    """Per platform: the CPU and memory that sessions reserve (running ones and those on the
    way: CONSUMING_STATES) against what the online agents offer (reported capacity x their
    overcommit ratios) and really have. One query (a subquery sums the reservations)."""
    reserved = (
        Session.objects.filter(state__in=CONSUMING_STATES, agent__isnull=False)
        .values("agent__platform")
        .annotate(cpu=Sum(charged_cpu()), memory_mb=Sum(charged_memory()), sessions=Count("id"))
        .order_by()
    )
    offered = (
        Agent.objects.filter(_online())
        .values("platform")
        .annotate(
            agents=Count("id"),
            cpu_real=Coalesce(Sum(_capacity("cpu", 0)), Value(0.0)),
            memory_real=Coalesce(Sum(_capacity("memory_mb", 0)), Value(0.0)),
            cpu_offered=Coalesce(Sum(_capacity("cpu", 0) * F("cpu_overcommit")), Value(0.0)),
            memory_offered=Coalesce(Sum(_capacity("memory_mb", 0) * F("memory_overcommit")), Value(0.0)),
        )
        .order_by()
    )
    rows: dict[str, dict] = {}
    for row in offered:
        rows[row["platform"]] = {**row, "cpu": 0.0, "memory_mb": 0, "sessions": 0}
    for row in reserved:
        platform = row["agent__platform"]
        base = rows.setdefault(
            platform,
            {"platform": platform, "agents": 0, "cpu_real": 0.0, "memory_real": 0.0, "cpu_offered": 0.0,
             "memory_offered": 0.0},
        )  # fmt: skip
        base.update(cpu=row["cpu"] or 0.0, memory_mb=row["memory_mb"] or 0, sessions=row["sessions"])
    return [rows[p] for p in sorted(rows)]


def _per_agent(aggregate, states, output_field=None):
    """A figure over the agent's sessions in ``states``, as a correlated subquery: the
    database works it out only for the rows of the page shown, and a page's count leaves it out."""
    rows = (
        Session.objects.filter(agent=OuterRef("pk"), state__in=states)
        .order_by()
        .values("agent")
        .annotate(figure=aggregate)
        .values("figure")
    )
    output_field = output_field or FloatField()
    return Coalesce(Subquery(rows, output_field=output_field), Value(0), output_field=output_field)


def agent_rows(*, platform: str = "", status: str = "", region: str = ""):
    """The agents table: each agent with its live sessions and the CPU and memory they
    reserve, filtered; the caller pages it."""
    agents = Agent.objects.annotate(
        live_sessions=_per_agent(Count("id"), LIVE_STATES, IntegerField()),
        cpu_reserved=_per_agent(Sum(charged_cpu()), CONSUMING_STATES),
        memory_reserved=_per_agent(Cast(Sum(charged_memory()), FloatField()), CONSUMING_STATES),
        cpu_capacity=_capacity("cpu", 0),
        memory_capacity=_capacity("memory_mb", 0),
        max_sessions=_capacity("max_sessions", 0),
        reporting=ExpressionWrapper(_online(), output_field=BooleanField()),
    ).order_by("agent_id")
    if platform:
        agents = agents.filter(platform=platform)
    if status == "stale":
        agents = agents.exclude(_online())
    elif status:
        agents = agents.filter(status=status)
    if region:
        agents = agents.filter(region=region)
    return agents


def agent_filter_choices() -> dict:
    """The values the agents table can be filtered by: one query for the regions in use."""
    regions = list(Agent.objects.exclude(region="").values_list("region", flat=True).distinct().order_by("region"))
    return {"platforms": Agent.Platform.values, "statuses": [*Agent.Status.values, "stale"], "regions": regions}


def page_of(queryset, number) -> object:
    """One page of a table (two queries: the count and the rows)."""
    return Paginator(queryset, PAGE_SIZE).get_page(number)


def agent_detail(*, agent_id: str) -> dict | None:
    agent = agent_rows().filter(agent_id=agent_id).first()
    if agent is None:
        return None
    sessions = list(
        Session.objects.filter(agent=agent, state__in=LIVE_STATES)
        .select_related("owner", "template", "agent")
        .order_by("-created_at")[:PAGE_SIZE]
    )
    commands = list(
        AgentCommand.objects.filter(agent=agent)
        .select_related("session")
        .order_by("-created_at", "-id")[:RECENT_COMMANDS]
    )
    return {"agent": agent, "sessions": sessions, "commands": commands, "online": agent_is_online(agent)}


def agent_is_online(agent: Agent) -> bool:
    cutoff = agent_liveness_cutoff()
    return agent.status in (Agent.Status.ONLINE, Agent.Status.DRAINING) and bool(
        agent.last_heartbeat and agent.last_heartbeat >= cutoff
    )


SESSION_STATE_FILTERS = ("live", *State.ALL, "all")


def session_rows(*, state: str = "live", user: str = "", agent: str = "", template: str = "", idle_minutes=None):
    """The sessions table across users: filtered by state ("live": every live state, "all":
    any), owner's username, agent id, template slug, and idle for at least ``idle_minutes``
    (no viewer activity since then; a session never used counts from its start)."""
    sessions = Session.objects.select_related("owner", "template", "agent").annotate(
        idle_since=Coalesce("last_activity", "started_at", "created_at")
    )
    if state == "live" or not state:
        sessions = sessions.filter(state__in=LIVE_STATES)
    elif state != "all":
        sessions = sessions.filter(state=state)
    if user:
        sessions = sessions.filter(owner__username=user)
    if agent:
        sessions = sessions.filter(agent__agent_id=agent)
    if template:
        sessions = sessions.filter(template__slug=template)
    if idle_minutes is not None:
        sessions = sessions.filter(idle_since__lte=timezone.now() - timedelta(minutes=idle_minutes))
    return sessions.order_by("-created_at")


def session_timeline(*, session: Session) -> list[dict]:
    """Everything that happened to the session, oldest first: its state changes (with why),
    the commands sent to its agent (with how long each took and its error), and the viewer
    connections (with the bytes each way and why it closed). Three queries."""
    entries = []
    for event in SessionEvent.objects.filter(session=session).order_by("-at", "-id")[:TIMELINE_LIMIT]:
        entries.append({"at": event.at, "kind": "state", "event": event})
    commands = AgentCommand.objects.filter(session=session).order_by("-created_at", "-id")[:TIMELINE_LIMIT]
    for command in commands:
        entries.append({"at": command.created_at, "kind": "command", "command": command, **command_timings(command)})
    viewers = VNCConnection.objects.filter(session=session).select_related("user").order_by("-opened_at")
    for connection in viewers[:TIMELINE_LIMIT]:
        entries.append({"at": connection.opened_at, "kind": "viewer", "connection": connection})
    entries.sort(key=lambda e: e["at"])
    return entries


def _ms(start, end) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds() * 1000


def command_timings(command: AgentCommand) -> dict:
    """Milliseconds: queued (created -> sent), ack (sent -> acked), and total (created -> done)."""
    return {
        "queued_ms": _ms(command.created_at, command.sent_at),
        "ack_ms": _ms(command.sent_at, command.acked_at),
        "total_ms": _ms(command.created_at, command.completed_at),
    }
