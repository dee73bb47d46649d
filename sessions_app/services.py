"""Every write to sessions goes through these functions, each in one transaction."""

from __future__ import annotations

import logging
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from agent_clients.protocol import REPORTED_STATES
from agents_app.commands import command_enqueue
from agents_app.models import AgentCommand
from agents_app.selectors import agent_select_for_session
from sessions_app.limits import charged_cpu, charged_memory, validate_cpu, validate_memory
from sessions_app.models import Quota, Session, SessionEvent, Template
from sessions_app.states import CONSUMING_STATES, LIVE_STATES, State, next_state
from streamspace.errors import Conflict, InvalidInput, QuotaExceeded
from streamspace.text import has_control_characters

log = logging.getLogger(__name__)

MAX_TAGS = 20
MAX_TAG_LENGTH = 64


# --- validation -------------------------------------------------------------------------


def validate_tags(value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidInput("tags must be a list of strings", field="tags")
    if len(value) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} tags", field="tags")
    for tag in value:
        if not tag.strip() or len(tag) > MAX_TAG_LENGTH:
            raise InvalidInput(f"each tag must be 1 to {MAX_TAG_LENGTH} characters", field="tags")
        if has_control_characters(tag):
            raise InvalidInput("a tag must not contain NUL or other control characters", field="tags")
    return list(dict.fromkeys(t.strip() for t in value))


# --- quotas -----------------------------------------------------------------------------


def _limits_for(user) -> list[tuple[str, int, float, int, object]]:
    """(label, max sessions, max cpu, max memory, sessions queryset) for each quota that applies."""
    user_quota = Quota.objects.filter(user=user).first()
    limits = [
        (
            "your",
            user_quota.max_sessions if user_quota else settings.QUOTA_DEFAULT_MAX_SESSIONS,
            user_quota.max_cpu if user_quota else settings.QUOTA_DEFAULT_MAX_CPU,
            user_quota.max_memory_mb if user_quota else settings.QUOTA_DEFAULT_MAX_MEMORY_MB,
            Session.objects.filter(owner=user),
        )
    ]
    for quota in Quota.objects.filter(group__in=user.groups.all()).select_related("group"):
        limits.append(
            (
                f"group {quota.group.name}'s",
                quota.max_sessions,
                quota.max_cpu,
                quota.max_memory_mb,
                Session.objects.filter(owner__groups=quota.group),
            )
        )
    return limits


def quota_check(*, user, add_sessions: int, add_cpu: float, add_memory_mb: int, exclude=None) -> None:
    """Raise QuotaExceeded if adding this much would break the user's or a group's quota."""
    for label, max_sessions, max_cpu, max_memory, sessions in _limits_for(user):
        if exclude is not None:
            sessions = sessions.exclude(pk=exclude.pk)
        live = sessions.filter(state__in=LIVE_STATES).distinct().count()
        used = (
            sessions.filter(state__in=CONSUMING_STATES)
            .distinct()
            .aggregate(
                cpu=Sum(charged_cpu(), default=0.0),
                memory=Sum(charged_memory(), default=0),
            )
        )
        if live + add_sessions > max_sessions:
            raise QuotaExceeded(f"{label} quota allows {max_sessions} live sessions and {live} exist")
        if used["cpu"] + add_cpu > max_cpu + 1e-9:
            raise QuotaExceeded(f"{label} quota allows {max_cpu:g} CPU; {used['cpu']:g} in use, {add_cpu:g} asked")
        if used["memory"] + add_memory_mb > max_memory:
            raise QuotaExceeded(
                f"{label} quota allows {max_memory} MB memory; {used['memory']} in use, {add_memory_mb} asked"
            )


def _lock_quota_holders(user) -> None:
    """Serialise concurrent creates/wakes by the same user or group members."""
    get_user_model().objects.select_for_update().filter(pk=user.pk).exists()
    list(Quota.objects.select_for_update().filter(group__in=user.groups.all()).values_list("pk", flat=True))


# --- state changes ----------------------------------------------------------------------


def _move(session: Session, target: str, *, reason: str = "", **fields) -> None:
    """Apply one transition with a compare-and-swap on the current state, and record it on
    the session's timeline (``reason``, else the error message it carries)."""
    next_state(session.state, target)
    now = timezone.now()
    fields.update(state=target, state_changed_at=now, updated_at=now)
    if Session.objects.filter(pk=session.pk, state=session.state).update(**fields) != 1:
        raise Conflict("the session changed meanwhile; reload and try again")
    SessionEvent.objects.create(
        session_id=session.pk,
        from_state=session.state,
        to_state=target,
        reason=(reason or fields.get("error_message") or "")[:2000],
    )
    for name, value in fields.items():
        setattr(session, name, value)


def session_create(
    *,
    user,
    template_slug: str,
    cpu=None,
    memory_mb=None,
    tags=None,
    keep_home: bool = False,
    platform: str = "",
    region: str = "",
) -> Session:
    if has_control_characters(template_slug):  # the portal's form too: PostgreSQL refuses a NUL
        raise InvalidInput("template must not contain NUL or other control characters", field="template")
    template = Template.objects.filter(slug=template_slug, enabled=True).first()
    if template is None:
        raise InvalidInput(f"no enabled template {template_slug!r}", field="template")
    cpu = validate_cpu(template.default_cpu if cpu is None else cpu)
    memory_mb = validate_memory(template.default_memory_mb if memory_mb is None else memory_mb)
    tags = validate_tags(tags)
    if not isinstance(keep_home, bool):
        raise InvalidInput("keep_home must be true or false", field="keep_home")
    platform = template.platform or platform
    region = template.region or region
    with transaction.atomic():
        _lock_quota_holders(user)
        quota_check(user=user, add_sessions=1, add_cpu=cpu, add_memory_mb=memory_mb)
        agent = agent_select_for_session(cpu=cpu, memory_mb=memory_mb, platform=platform, region=region)
        session = Session.objects.create(
            owner=user,
            template=template,
            agent=agent,
            platform=agent.platform,
            region=agent.region,
            tags=tags,
            cpu=cpu,
            memory_mb=memory_mb,
            keep_home=keep_home,
            vnc_password=secrets.token_urlsafe(6)[:8],
            sound=template.sound,
        )
        SessionEvent.objects.create(session=session, to_state=session.state, reason=f"launched on {agent.agent_id}")
        command_enqueue(
            agent=agent,
            session=session,
            type=AgentCommand.Type.CREATE_SESSION,
            payload={
                "owner": user.get_username(),
                "template": template.as_payload(),
                "cpu": cpu,
                "memory_mb": memory_mb,
                "keep_home": keep_home,
                "vnc_password": session.vnc_password,
            },
        )
    log.info("session %s created for %s on agent %s", session.pk, user.get_username(), agent.agent_id)
    return session


def _policy_fields(policy_reason: str) -> dict:
    """A lifecycle policy's action says why (the portal shows it); a user's clears the last one."""
    return {"reason": policy_reason, "lifecycle_reason": policy_reason[:255], "idle_warned_at": None}


@transaction.atomic
def session_terminate(*, session: Session, policy_reason: str = "") -> Session:
    session = Session.objects.select_for_update().get(pk=session.pk)
    if session.state in (State.TERMINATED, State.TERMINATING):
        return session
    if session.state == State.PENDING and _cancel_undelivered_create(session):
        _move(session, State.TERMINATING, **_policy_fields(policy_reason))
        _move(session, State.TERMINATED, terminated_at=timezone.now())
        return session
    if session.agent_id is None:
        _move(session, State.TERMINATING, **_policy_fields(policy_reason))
        _move(session, State.TERMINATED, terminated_at=timezone.now())
        return session
    _move(session, State.TERMINATING, **_policy_fields(policy_reason))
    command_enqueue(
        agent=session.agent,
        session=session,
        type=AgentCommand.Type.TERMINATE_SESSION,
        payload={"keep_home": session.keep_home},
    )
    return session


def _cancel_undelivered_create(session: Session) -> bool:
    """A create the agent never received can be cancelled outright."""
    return (
        AgentCommand.objects.filter(
            session=session, type=AgentCommand.Type.CREATE_SESSION, status=AgentCommand.Status.PENDING, attempts=0
        ).update(
            status=AgentCommand.Status.FAILED,
            error_message="cancelled: the session was terminated before delivery",
            completed_at=timezone.now(),
        )
        == 1
    )


@transaction.atomic
def session_hibernate(*, session: Session, policy_reason: str = "") -> Session:
    """Hibernate: by the user, or by a lifecycle policy (``policy_reason``, on the timeline)."""
    session = Session.objects.select_for_update().get(pk=session.pk)
    _move(session, State.HIBERNATING, **_policy_fields(policy_reason))
    command_enqueue(agent=session.agent, session=session, type=AgentCommand.Type.HIBERNATE_SESSION)
    return session


@transaction.atomic
def session_wake(*, session: Session) -> Session:
    session = Session.objects.select_for_update().get(pk=session.pk)
    next_state(session.state, State.WAKING)
    _lock_quota_holders(session.owner)
    quota_check(
        user=session.owner,
        add_sessions=0,
        # a session stored before the minimums existed is charged the minimum, not less
        add_cpu=max(session.cpu, settings.SESSION_MIN_CPU),
        add_memory_mb=max(session.memory_mb, settings.SESSION_MIN_MEMORY_MB),
        exclude=session,
    )
    _move(session, State.WAKING, lifecycle_reason="", idle_warned_at=None)
    command_enqueue(agent=session.agent, session=session, type=AgentCommand.Type.WAKE_SESSION)
    return session


@transaction.atomic
def session_record_activity(*, session_id) -> None:
    """The user's input (through the relay): the session is not idle, any idle warning goes."""
    Session.objects.filter(pk=session_id).update(last_activity=timezone.now(), idle_warned_at=None)


def session_keepalive(*, session: Session) -> Session:
    """ "Stay" in the viewer: counts as input, so the idle warning goes. Whoever may open the
    viewer may press it (the owner, staff), as their typing through the relay counts too."""
    now = timezone.now()
    if Session.objects.filter(pk=session.pk, state=State.RUNNING).update(last_activity=now, idle_warned_at=None) != 1:
        raise Conflict(f"the session is {Session.objects.get(pk=session.pk).state}, not running")
    session.last_activity, session.idle_warned_at = now, None
    return session


# --- effects of agent answers -----------------------------------------------------------


def endpoint_fields(result: dict) -> dict:
    """The VNC endpoint an agent reported (vnc_host / vnc_port), as Session fields."""
    fields = {}
    if isinstance(result.get("vnc_host"), str):
        fields["vnc_host"] = result["vnc_host"]
    if isinstance(result.get("vnc_port"), int):
        fields["vnc_port"] = result["vnc_port"]
    return fields


def session_on_command_completed(*, command: AgentCommand, result: dict) -> None:
    session = Session.objects.select_for_update().filter(pk=command.session_id).first()
    if session is None:
        return
    kind = command.type
    T = AgentCommand.Type
    if kind == T.CREATE_SESSION and session.state in (State.PENDING, State.STARTING, State.DEGRADED):
        _move(session, State.RUNNING, started_at=timezone.now(), error_message=None, **endpoint_fields(result))
    elif kind == T.WAKE_SESSION and session.state in (State.WAKING, State.DEGRADED):
        _move(session, State.RUNNING, error_message=None, **endpoint_fields(result))
    elif kind == T.HIBERNATE_SESSION and session.state in (State.HIBERNATING, State.DEGRADED):
        _move(session, State.HIBERNATED)
    elif kind == T.TERMINATE_SESSION and session.state == State.TERMINATING:
        _move(session, State.TERMINATED, terminated_at=timezone.now())
    # A failed session stays failed when the cleanup of its leftovers completes (the user
    # still sees why it failed, and its home, if it ever ran, stays until they terminate it).
    elif kind == T.GET_SESSION:
        session_settle(session=session, reported=str(result.get("state", "")), endpoint=endpoint_fields(result))


def session_on_create_acked(*, command: AgentCommand) -> None:
    """The agent took the create: the session's status moves from pending to starting."""
    session = Session.objects.select_for_update().filter(pk=command.session_id, state=State.PENDING).first()
    if session is not None:
        _move(session, State.STARTING)


def session_degrade(*, session: Session, reason: str) -> None:
    """The session's agent went silent: running, but unreachable until it reports again."""
    _move(session, State.DEGRADED, error_message=reason)


_FAILABLE = (State.PENDING, State.STARTING, State.WAKING, State.TERMINATING, State.HIBERNATING, State.DEGRADED)


def session_on_command_failed(*, command: AgentCommand, error: str) -> None:
    session = Session.objects.select_for_update().filter(pk=command.session_id).first()
    if session is None:
        return
    T = AgentCommand.Type
    message = f"{command.type.replace('_', ' ')} failed: {error}"[:2000]
    if command.type == T.HIBERNATE_SESSION and session.state == State.HIBERNATING:
        _move(session, State.RUNNING, error_message=message)
    elif command.type == T.WAKE_SESSION and session.state == State.WAKING:
        # Nothing was lost: the desktop stays hibernated with its home, and can be woken again.
        _move(session, State.HIBERNATED, error_message=message)
    elif command.type != T.GET_SESSION and session.state in _FAILABLE:
        _move(session, State.FAILED, error_message=message)


# What the agent reports holding decides, for every (database state, reported state) pair:
# a target state, CLEANUP (a finished session still has something on the engine: a terminate
# removes it, the session is never resurrected), HIBERNATE_AGAIN (a hibernated session's
# desktop runs: the hibernation stands), or None (nothing: a command in flight will settle it,
# or the two agree), for each of protocol.REPORTED_STATES ("missing": the agent does not list it).
CLEANUP = "cleanup"
HIBERNATE_AGAIN = "hibernate again"
S = State
# An answer to the command in flight settles the state: a report changes nothing meanwhile.
_WAIT_FOR_THE_ANSWER: dict[str, str | None] = dict.fromkeys(REPORTED_STATES)
# A finished session: anything the agent still holds for it is removed.
_REMOVE_LEFTOVERS: dict[str, str | None] = {**dict.fromkeys(REPORTED_STATES, CLEANUP), "missing": None}
_RECONCILE: dict[str, dict[str, str | None]] = {
    S.PENDING: _WAIT_FOR_THE_ANSWER,  # the create's
    S.STARTING: _WAIT_FOR_THE_ANSWER,
    S.HIBERNATING: _WAIT_FOR_THE_ANSWER,
    S.WAKING: _WAIT_FOR_THE_ANSWER,
    S.TERMINATING: _WAIT_FOR_THE_ANSWER,
    S.RUNNING: {
        "running": None,
        "starting": None,
        "hibernated": S.HIBERNATED,  # a hibernate that went through late, or a clean stop: home kept
        "stopped": S.FAILED,
        "failed": S.FAILED,
        "missing": S.FAILED,
    },
    S.HIBERNATED: {
        "running": HIBERNATE_AGAIN,
        "starting": HIBERNATE_AGAIN,
        "hibernated": None,
        "stopped": None,
        "failed": S.FAILED,
        "missing": S.FAILED,
    },
    S.DEGRADED: {
        "running": S.RUNNING,
        "starting": None,
        "hibernated": S.HIBERNATED,
        "stopped": S.HIBERNATED,
        "failed": S.FAILED,
        "missing": S.FAILED,
    },
    S.FAILED: _REMOVE_LEFTOVERS,
    S.TERMINATED: _REMOVE_LEFTOVERS,
}


def reconcile_action(state: str, reported: str) -> str | None:
    """The entry of the reconcile table (KeyError for a state or report it does not know)."""
    return _RECONCILE[state][reported]


def _lost_reason(reported: str, detail: str) -> str:
    if reported == "stopped":
        return detail or "the session's container stopped"
    if reported == "missing":
        return f"session lost: {detail or 'the agent no longer holds this session'}"
    return f"session lost: {detail or 'it failed'}"


def session_reconcile(*, session: Session, reported: str, detail: str = "", endpoint: dict | None = None) -> None:
    """Bring a (locked) session in line with what its agent reports holding: see _RECONCILE."""
    if reported not in REPORTED_STATES:
        log.warning("session %s: ignoring unknown reported state %r", session.pk, reported)
        return
    action = reconcile_action(session.state, reported)
    if action is None:
        return
    if action == State.RUNNING:
        _move(session, State.RUNNING, error_message=None, **(endpoint or {}))
    elif action == State.HIBERNATED:
        _move(session, State.HIBERNATED)
    elif action == State.FAILED:
        _move(session, State.FAILED, error_message=_lost_reason(reported, detail)[:2000])
    elif action == CLEANUP:
        # A failed session that once ran keeps its home (the user's Terminate removes it).
        keep_home = session.keep_home or (session.state == State.FAILED and session.started_at is not None)
        _enqueue_unless_in_flight(
            session, AgentCommand.Type.TERMINATE_SESSION, {"keep_home": keep_home, "cleanup": True}
        )
    elif action == HIBERNATE_AGAIN:
        _enqueue_unless_in_flight(session, AgentCommand.Type.HIBERNATE_SESSION, {})
    log.info("session %s (%s): agent reports %s -> %s", session.pk, session.state, reported, action)


def _enqueue_unless_in_flight(session: Session, type: str, payload: dict) -> None:
    """Queue a corrective command for the session, unless one is unfinished already."""
    if session.agent_id is None:
        return
    if AgentCommand.objects.filter(session=session, status__in=AgentCommand.UNFINISHED).exists():
        return
    command_enqueue(agent=session.agent, session=session, type=type, payload=payload)


def session_on_late_result(*, command: AgentCommand, result: dict) -> None:
    """A command the control plane had given up on completed after all: the session follows
    what the agent reports now (a running container of a failed session is removed)."""
    session = Session.objects.select_for_update().filter(pk=command.session_id).first()
    if session is None:
        return
    reported = str(result.get("state", ""))
    if reported == "terminated":
        reported = "missing"
    user_terminate = command.type == AgentCommand.Type.TERMINATE_SESSION and not command.payload.get("cleanup")
    if user_terminate and session.state == State.FAILED and reported == "missing":
        _move(session, State.TERMINATED, terminated_at=timezone.now())  # the terminate went through late
        return
    session_reconcile(session=session, reported=reported, detail=str(result.get("detail") or ""),
                      endpoint=endpoint_fields(result))  # fmt: skip


# What a get_session answer settles for a session stuck waiting: (state, reported) -> new state.
_SETTLE = {
    (State.PENDING, "running"): State.RUNNING,
    (State.STARTING, "running"): State.RUNNING,
    (State.WAKING, "running"): State.RUNNING,
    (State.HIBERNATING, "hibernated"): State.HIBERNATED,
    (State.HIBERNATING, "running"): State.RUNNING,
    (State.WAKING, "hibernated"): State.HIBERNATED,
    (State.TERMINATING, "missing"): State.TERMINATED,
}


def session_settle(*, session: Session, reported: str, endpoint: dict) -> None:
    """A stuck session was re-queried: take the agent's answer as the truth."""
    target = _SETTLE.get((session.state, reported))
    if target == State.TERMINATED:
        _move(session, target, terminated_at=timezone.now())
    elif target == State.RUNNING:
        _move(session, target, started_at=session.started_at or timezone.now(), **endpoint)
    elif target is not None:
        _move(session, target)
    elif session.state in (State.PENDING, State.STARTING, State.WAKING) and reported in ("missing", "failed"):
        _move(session, State.FAILED, error_message=f"the agent reports the session {reported}")
    else:
        session_reconcile(session=session, reported=reported, endpoint=endpoint)
