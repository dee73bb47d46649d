"""Reads about agents."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.utils import timezone

from agents_app.models import Agent, AgentCommand
from sessions_app.states import CONSUMING_STATES, LIVE_STATES
from streamspace.errors import NoAgentAvailable, NotFound


def agent_liveness_cutoff():
    """Agents whose last heartbeat is older than this are not live."""
    return timezone.now() - timedelta(seconds=settings.AGENT_HEARTBEAT_INTERVAL * settings.AGENT_MISSED_HEARTBEATS)


def agent_get(*, agent_id: str) -> Agent:
    try:
        return Agent.objects.get(agent_id=agent_id)
    except Agent.DoesNotExist:
        raise NotFound(f"no agent {agent_id!r}") from None


def agent_list(*, platform: str = "", status: str = "", region: str = ""):
    qs = Agent.objects.annotate(active_sessions=Count("sessions", filter=Q(sessions__state__in=LIVE_STATES))).order_by(
        "agent_id"
    )
    if platform:
        qs = qs.filter(platform=platform)
    if status:
        qs = qs.filter(status=status)
    if region:
        qs = qs.filter(region=region)
    return qs


def agent_select_for_session(*, cpu: float, memory_mb: int, platform: str = "", region: str = "") -> Agent:
    """The online agent with the most free capacity (sessions, then CPU, then memory)
    that fits the request. Raises NoAgentAvailable with the reason."""
    candidates = Agent.objects.filter(status=Agent.Status.ONLINE, last_heartbeat__gte=agent_liveness_cutoff())
    if platform:
        candidates = candidates.filter(platform=platform)
    if region:
        candidates = candidates.filter(region=region)
    candidates = candidates.annotate(
        live_sessions=Count("sessions", filter=Q(sessions__state__in=LIVE_STATES)),
        used_cpu=Sum("sessions__cpu", filter=Q(sessions__state__in=CONSUMING_STATES), default=0.0),
        used_memory=Sum("sessions__memory_mb", filter=Q(sessions__state__in=CONSUMING_STATES), default=0),
    )
    best, best_key = None, None
    for agent in candidates:
        cap = agent.capacity or {}
        free_sessions = _number(cap.get("max_sessions"), 10**6) - agent.live_sessions
        free_cpu = _number(cap.get("cpu"), 10**6) - (agent.used_cpu or 0)
        free_memory = _number(cap.get("memory_mb"), 10**9) - (agent.used_memory or 0)
        if free_sessions < 1 or free_cpu < cpu or free_memory < memory_mb:
            continue
        key = (free_sessions, free_cpu, free_memory, agent.agent_id)
        if best_key is None or key > best_key:
            best, best_key = agent, key
    if best is None:
        where = " ".join(filter(None, [platform and f"platform={platform}", region and f"region={region}"]))
        raise NoAgentAvailable(
            f"no online agent{' with ' + where if where else ''} has room for {cpu:g} CPU and {memory_mb} MB"
        )
    return best


def _number(value, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float(default)


def commands_to_deliver(*, agent_pk: int, limit: int = 100) -> list[AgentCommand]:
    """Pending commands of an agent in creation order, skipping any whose session has an
    earlier command still unfinished (so per-session order holds: a hibernate never
    overtakes the create)."""
    unfinished = list(
        AgentCommand.objects.filter(agent_id=agent_pk, status__in=AgentCommand.UNFINISHED)
        .select_related("session")
        .order_by("created_at", "id")[: limit * 4]
    )
    blocked_sessions: set = set()
    ready = []
    for command in unfinished:
        key = command.session_id
        if key is not None and key in blocked_sessions:
            continue
        if command.status == AgentCommand.Status.PENDING:
            ready.append(command)
        if key is not None:
            blocked_sessions.add(key)
        if len(ready) >= limit:
            break
    return ready
