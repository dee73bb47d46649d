"""Reads about agents."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, F, FloatField, Q, Sum, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce
from django.utils import timezone

from agents_app.models import Agent, AgentCommand
from sessions_app.limits import charged_cpu, charged_memory
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


def _capacity(key: str, default: float):
    """A numeric capacity figure from the JSON column (clean_capacity keeps them numeric)."""
    return Coalesce(Cast(KT(f"capacity__{key}"), FloatField()), Value(float(default)))


def agent_select_for_session(*, cpu: float, memory_mb: int, platform: str = "", region: str = "") -> Agent:
    """The online, undrained agent with the most free capacity (sessions, then CPU, then
    memory) that fits the request; the ranking runs in the database. Raises
    NoAgentAvailable saying why none fits (see ``_why_no_agent``).

    An agent offers its reported CPU and memory times its overcommit ratios (idle desktops
    use little CPU); one session never gets more than the agent's real cores or memory."""
    candidates = _agents_matching(platform, region).filter(
        status=Agent.Status.ONLINE, drain_requested=False, last_heartbeat__gte=agent_liveness_cutoff()
    )
    live = Q(sessions__state__in=LIVE_STATES)
    consuming = Q(sessions__state__in=CONSUMING_STATES)
    best = (
        candidates.annotate(
            cpu_real=_capacity("cpu", 10**6),
            memory_real=_capacity("memory_mb", 10**9),
            free_sessions=_capacity("max_sessions", 10**6) - Count("sessions", filter=live),
            free_cpu=_capacity("cpu", 10**6) * F("cpu_overcommit")
            - Coalesce(Sum(charged_cpu("sessions__cpu"), filter=consuming), Value(0.0)),
            free_memory=_capacity("memory_mb", 10**9) * F("memory_overcommit")
            - Coalesce(Cast(Sum(charged_memory("sessions__memory_mb"), filter=consuming), FloatField()), Value(0.0)),
        )
        .filter(
            cpu_real__gte=cpu,
            memory_real__gte=memory_mb,
            free_sessions__gte=1,
            free_cpu__gte=cpu,
            free_memory__gte=memory_mb,
        )
        .order_by("-free_sessions", "-free_cpu", "-free_memory", "agent_id")
        .first()
    )
    if best is None:
        raise NoAgentAvailable(_why_no_agent(cpu=cpu, memory_mb=memory_mb, platform=platform, region=region))
    return best


def _agents_matching(platform: str, region: str):
    agents = Agent.objects.all()
    if platform:
        agents = agents.filter(platform=platform)
    if region:
        agents = agents.filter(region=region)
    return agents


def _why_no_agent(*, cpu: float, memory_mb: int, platform: str, region: str) -> str:
    """What is wrong and what to do, for the user who could not launch a desktop."""
    where = " ".join(filter(None, [platform and f"platform={platform}", region and f"region={region}"]))
    agent = f"agent ({where})" if where else "agent"
    agents = _agents_matching(platform, region)
    if not agents.exists():
        return (
            f"No {agent} is registered to run desktops yet. "
            "Ask your administrator to start one (see the README, 'Agents')."
        )
    live = agents.filter(
        status__in=(Agent.Status.ONLINE, Agent.Status.DRAINING), last_heartbeat__gte=agent_liveness_cutoff()
    )
    if not live.exists():
        return (
            f"No {agent} is online: every registered one has stopped reporting. "
            "Ask your administrator to check the agents; try again once one is back."
        )
    taking = live.filter(status=Agent.Status.ONLINE, drain_requested=False)
    if not taking.exists():
        return (
            f"Every online {agent} is draining (taking no new sessions, for maintenance). "
            "Try again later, or ask your administrator to undrain one."
        )
    big_enough = taking.annotate(cpu_real=_capacity("cpu", 10**6), memory_real=_capacity("memory_mb", 10**9)).filter(
        cpu_real__gte=cpu, memory_real__gte=memory_mb
    )
    if not big_enough.exists():
        return (
            f"No online {agent} is big enough for {cpu:g} CPU and {memory_mb} MB. "
            "Choose a smaller desktop, or ask your administrator for a larger host."
        )
    return (
        f"Every online {agent} is full: none has room for {cpu:g} CPU and {memory_mb} MB right now. "
        "Try again when a session ends (hibernating or terminating one of yours frees room)."
    )


CAPACITY_KEYS = ("cpu", "memory_mb", "max_sessions")


def clean_capacity(raw) -> dict:
    """Capacity as stored: the known figures as non-negative numbers, anything else dropped."""
    if not isinstance(raw, dict):
        return {}
    clean = {}
    for key in CAPACITY_KEYS:
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12:
            clean[key] = value
    return clean


def commands_to_deliver(*, agent_pk: int, limit: int = 100) -> list[AgentCommand]:
    """Pending commands of an agent in creation order, skipping any whose session has an
    earlier command still unfinished (so per-session order holds: a hibernate never
    overtakes the create). A command waiting out its retry backoff (``not_before`` in the
    future) is not delivered yet, and still holds back the later commands of its session."""
    now = timezone.now()
    unfinished = list(
        AgentCommand.objects.filter(agent_id=agent_pk, status__in=AgentCommand.UNFINISHED).order_by("created_at", "id")[
            : limit * 4
        ]
    )
    blocked_sessions: set = set()
    ready = []
    for command in unfinished:
        key = command.session_id
        if key is not None and key in blocked_sessions:
            continue
        due = command.not_before is None or command.not_before <= now
        if command.status == AgentCommand.Status.PENDING and due:
            ready.append(command)
        if key is not None:
            blocked_sessions.add(key)
        if len(ready) >= limit:
            break
    return ready
