"""Writes about agents: registration, tokens, the socket lifecycle, and command answers."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid

from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from agent_clients import protocol
from agents_app import selectors
from agents_app.commands import command_enqueue, command_requeue_unfinished, command_retry_later
from agents_app.models import Agent, AgentCommand
from sessions_app import services as session_services
from sessions_app.models import Session
from sessions_app.states import LIVE_STATES, State
from streamspace.errors import Conflict, InvalidInput, PermissionDenied

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ssa_"  # noqa: S105 (a prefix, not a secret)
AGENT_ID_MAX = 255


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


def hash_token(raw: str) -> str:
    """Agent tokens are 256-bit random strings, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(raw.encode()).hexdigest()


def token_matches(agent: Agent, raw: str | None) -> bool:
    return bool(raw and agent.token_hash) and hmac.compare_digest(agent.token_hash, hash_token(raw))


def bootstrap_token_matches(raw: str | None, expected: str) -> bool:
    return bool(raw and expected) and hmac.compare_digest(raw.encode(), expected.encode())


def agent_issue_token(*, agent: Agent) -> str:
    """Give the agent a new token (the old one stops working) and return it: shown once, stored hashed."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    Agent.objects.filter(pk=agent.pk).update(token_hash=hash_token(raw), updated_at=timezone.now())
    agent.token_hash = hash_token(raw)
    return raw


TOKEN_MIN_LENGTH = 32


def agent_set_token(*, agent: Agent, raw: str) -> bool:
    """Make ``raw`` the agent's token (a deployment that keeps its secrets in its own store,
    e.g. Docker Compose's env file). Returns False when it already was: nothing written."""
    if len(raw) < TOKEN_MIN_LENGTH or not raw.isascii() or not raw.isprintable() or " " in raw:
        raise InvalidInput(
            f"an agent token must be at least {TOKEN_MIN_LENGTH} printable ASCII characters without spaces"
            " (e.g. openssl rand -hex 32)",
            field="token",
        )
    if token_matches(agent, raw):
        return False
    Agent.objects.filter(pk=agent.pk).update(token_hash=hash_token(raw), updated_at=timezone.now())
    agent.token_hash = hash_token(raw)
    return True


def _validate_registration(agent_id, platform, region, capacity, metadata) -> None:
    if not isinstance(agent_id, str) or not agent_id.strip() or len(agent_id) > AGENT_ID_MAX:
        raise InvalidInput("agent_id must be a non-empty string of at most 255 characters", field="agent_id")
    if not all(c.isalnum() or c in "-_.:" for c in agent_id):
        raise InvalidInput("agent_id may hold letters, digits and - _ . : only", field="agent_id")
    if platform not in Agent.Platform.values:
        raise InvalidInput(f"platform must be one of {', '.join(Agent.Platform.values)}", field="platform")
    if not isinstance(region, str) or len(region) > 100:
        raise InvalidInput("region must be a string of at most 100 characters", field="region")
    if not isinstance(capacity, dict) or not isinstance(metadata, dict):
        raise InvalidInput("capacity and metadata must be objects", field="capacity")


@transaction.atomic
def agent_register(
    *, agent_id, platform, region="", capacity=None, metadata=None, agent_token: str | None = None
) -> tuple[Agent, str | None, bool]:
    """Register an agent. Returns (agent, new token or None, created).

    A duplicate agent_id is refused unless the caller proves it is that agent with its token."""
    capacity = {} if capacity is None else capacity
    metadata = {} if metadata is None else metadata
    _validate_registration(agent_id, platform, region, capacity, metadata)
    existing = Agent.objects.select_for_update().filter(agent_id=agent_id).first()
    if existing is not None:
        if not token_matches(existing, agent_token):
            raise Conflict(f"agent {agent_id!r} is already registered")
        existing.platform, existing.region = platform, region
        existing.capacity, existing.metadata = selectors.clean_capacity(capacity), metadata
        existing.save(update_fields=["platform", "region", "capacity", "metadata", "updated_at"])
        return existing, None, False
    agent = Agent.objects.create(
        agent_id=agent_id,
        platform=platform,
        region=region,
        capacity=selectors.clean_capacity(capacity),
        metadata=metadata,
    )
    return agent, agent_issue_token(agent=agent), True


@transaction.atomic
def agent_delete(*, agent: Agent) -> None:
    if Session.objects.filter(agent=agent, state__in=LIVE_STATES).exists():
        raise Conflict(f"agent {agent.agent_id!r} still holds live sessions; drain or terminate them first")
    agent.delete()


def agent_authenticate(*, agent_id: str, raw_token: str | None) -> Agent | None:
    agent = Agent.objects.filter(agent_id=agent_id).first()
    if agent is None or not token_matches(agent, raw_token):
        return None
    return agent


def agent_drain(*, agent: Agent) -> int:
    """The operator's drain: no new session lands on the agent until it is undrained; its
    sessions keep running. Heartbeats and hellos never undo it. Returns its live sessions."""
    Agent.objects.filter(pk=agent.pk).update(
        drain_requested=True,
        status=Case(When(status=Agent.Status.ONLINE, then=Value(Agent.Status.DRAINING)), default=F("status")),
        updated_at=timezone.now(),
    )
    return Session.objects.filter(agent=agent, state__in=LIVE_STATES).count()


def agent_undrain(*, agent: Agent) -> None:
    """Take new sessions again. An agent draining itself (SIGTERM) says so in its next heartbeat."""
    Agent.objects.filter(pk=agent.pk).update(
        drain_requested=False,
        status=Case(When(status=Agent.Status.DRAINING, then=Value(Agent.Status.ONLINE)), default=F("status")),
        updated_at=timezone.now(),
    )


def _live_status(*, agent_draining: bool = False):
    """The status of an agent that just spoke: draining while the operator's drain or the
    agent's own (a SIGTERM drain) holds, else online. Evaluated in the UPDATE itself, so a
    drain committed a moment before is never overwritten."""
    if agent_draining:
        return Value(Agent.Status.DRAINING)
    return Case(When(drain_requested=True, then=Value(Agent.Status.DRAINING)), default=Value(Agent.Status.ONLINE))


# --- the socket lifecycle ---------------------------------------------------------------


class Superseded(PermissionDenied):
    """The answering socket is no longer the agent's current connection: another process
    (or a newer connection of this one) took its place. Nothing it says is accepted."""


def agent_attach(*, agent_pk: int, channel_name: str) -> str:
    """Record the socket that now serves this agent; return the channel of the one it replaces.

    One live connection per agent: from now on every answer from the replaced socket is
    refused (``current_connection``), and that socket is told to stop."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True).get(pk=agent_pk)
        previous = agent.channel_name
        agent.channel_name = channel_name
        agent.save(update_fields=["channel_name", "updated_at"])
    return previous if previous != channel_name else ""


def agent_detach(*, agent_pk: int, channel_name: str) -> None:
    """Forget the socket, unless a newer one has replaced it already. Liveness is left to
    heartbeats: a quick reconnect does not degrade anyone's session."""
    Agent.objects.filter(pk=agent_pk, channel_name=channel_name).update(channel_name="", updated_at=timezone.now())


def current_connection(*, agent_pk: int, channel_name: str) -> Agent:
    """Lock the agent's row if ``channel_name`` is still its current socket; raise Superseded
    otherwise. Called first in every transaction that takes an agent's answer, so an answer
    and a newer connection's attach are serialised on the row. A no-key lock: a user's
    action that inserts a command for this agent (its foreign key takes a key-share lock on
    the row) must not wait on it, or the two deadlock over the session row."""
    agent = Agent.objects.select_for_update(no_key=True).filter(pk=agent_pk, channel_name=channel_name).first()
    if agent is None or not channel_name:
        raise Superseded("another connection of this agent replaced this one")
    return agent


@transaction.atomic
def agent_hello(*, agent_pk: int, channel_name: str, payload: dict) -> None:
    """The agent (re)connected: update what it is, reconcile what it holds, requeue unfinished commands."""
    current_connection(agent_pk=agent_pk, channel_name=channel_name)
    now = timezone.now()
    fields = {
        "platform": payload["platform"],
        "capacity": selectors.clean_capacity(payload["capacity"]),
        "version": str(payload["version"])[:50],
        "status": _live_status(),
        "last_heartbeat": now,
        "updated_at": now,
    }
    if payload.get("region"):
        fields["region"] = str(payload["region"])[:100]
    Agent.objects.filter(pk=agent_pk).update(**fields)
    reported = _reported_sessions(payload["sessions"])
    reported_pks = [pk for pk in map(_uuid_or_none, reported) if pk is not None]
    # What it should hold, and whatever it reports (a failed session's container is removed).
    held = Session.objects.select_for_update().filter(
        Q(state__in=(State.RUNNING, State.DEGRADED, State.HIBERNATED)) | Q(pk__in=reported_pks), agent_id=agent_pk
    )
    for session in held:
        entry = reported.get(str(session.pk))
        if entry is None:
            session_services.session_reconcile(session=session, reported="missing")
        else:
            session_services.session_reconcile(
                session=session,
                reported=entry["state"],
                detail=entry.get("detail") or "",
                endpoint=session_services.endpoint_fields(entry),
            )
    requeued = command_requeue_unfinished(agent_pk=agent_pk)
    if requeued:
        log.info("agent %s hello: %d commands requeued for redelivery", agent_pk, requeued)


def _reported_sessions(items: list) -> dict[str, dict]:
    out = {}
    for item in items:
        if (
            isinstance(item, dict)
            and isinstance(item.get("session_id"), str)
            and item.get("state") in (protocol.REPORTED_STATES)
        ):
            out[item["session_id"]] = item
    return out


@transaction.atomic
def agent_heartbeat(*, agent_pk: int, channel_name: str, payload: dict) -> None:
    current_connection(agent_pk=agent_pk, channel_name=channel_name)
    status = _live_status(agent_draining=payload["status"] == "draining")
    Agent.objects.filter(pk=agent_pk).update(
        last_heartbeat=timezone.now(),
        capacity=selectors.clean_capacity(payload["capacity"]),
        status=status,
        updated_at=timezone.now(),
    )
    reported = _reported_sessions(payload["sessions"])
    running = [sid for sid, e in reported.items() if e["state"] == "running"]
    if running and Session.objects.filter(agent_id=agent_pk, state=State.DEGRADED, pk__in=running).exists():
        with transaction.atomic():
            for session in Session.objects.select_for_update().filter(
                agent_id=agent_pk, state=State.DEGRADED, pk__in=running
            ):
                session_services.session_reconcile(session=session, reported="running")


# --- command answers --------------------------------------------------------------------


class NotOwnedByAgent(PermissionDenied):
    """The command or session does not exist or belongs to another agent."""


def _own_command(agent_pk: int, command_id: str) -> AgentCommand:
    command = AgentCommand.objects.select_for_update().filter(command_id=command_id, agent_id=agent_pk).first()
    if command is None:
        raise NotOwnedByAgent(f"no command {command_id[:64]!r} for this agent")
    return command


GIVEN_UP = (AgentCommand.Status.FAILED, AgentCommand.Status.TIMED_OUT)


@transaction.atomic
def command_ack(*, agent_pk: int, channel_name: str, command_id: str, execution: int = 1) -> str | None:
    """Record the agent's ack. Returns the reason the command is void when the control plane
    has given up on this execution (the agent then skips it if it has not started it yet)."""
    current_connection(agent_pk=agent_pk, channel_name=channel_name)
    command = _own_command(agent_pk, command_id)
    if command.status in GIVEN_UP:
        return f"the control plane gave up on this command: {command.error_message or command.status}"[:500]
    if execution != command.execution:
        return f"execution {execution} is over; the command is at execution {command.execution}"
    if command.status not in (AgentCommand.Status.SENT, AgentCommand.Status.PENDING):
        return None  # a late or repeated ack changes nothing
    AgentCommand.objects.filter(pk=command.pk).update(status=AgentCommand.Status.ACKED, acked_at=timezone.now())
    if command.type == AgentCommand.Type.CREATE_SESSION and command.session_id:
        session_services.session_on_create_acked(command=command)
    return None


@transaction.atomic
def command_complete(*, agent_pk: int, channel_name: str, command_id: str, result: dict, execution: int = 1) -> None:
    current_connection(agent_pk=agent_pk, channel_name=channel_name)
    command = _own_command(agent_pk, command_id)
    if execution != command.execution:
        log.info("command %s: ignoring the answer of execution %d (now %d)", command_id, execution, command.execution)
        return
    if command.status in GIVEN_UP:
        # The agent did it after all (it was frozen, say): the record says what happened,
        # and the session follows what the agent holds now.
        note = f"{command.error_message or command.status}; completed late, after the control plane gave up"
        AgentCommand.objects.filter(pk=command.pk).update(
            status=AgentCommand.Status.COMPLETED, result=result, error_message=note[:4000], completed_at=timezone.now()
        )
        log.warning("command %s %s completed after it was given up: reconciling", command_id, command.type)
        if command.session_id:
            session_services.session_on_late_result(command=command, result=result)
        return
    if command.status not in AgentCommand.UNFINISHED:
        return  # already finished: a redelivered answer is ignored
    AgentCommand.objects.filter(pk=command.pk).update(
        status=AgentCommand.Status.COMPLETED, result=result, completed_at=timezone.now()
    )
    log.info("command %s %s completed (execution %d)", command_id, command.type, execution)
    session_services.session_on_command_completed(command=command, result=result)


@transaction.atomic
def command_fail(
    *,
    agent_pk: int,
    channel_name: str,
    command_id: str,
    error: str,
    retryable: bool,
    max_attempts: int,
    execution: int = 1,
) -> None:
    current_connection(agent_pk=agent_pk, channel_name=channel_name)
    command = _own_command(agent_pk, command_id)
    if execution != command.execution:
        log.info("command %s: ignoring the failure of execution %d (now %d)", command_id, execution, command.execution)
        return
    if command.status in GIVEN_UP:
        # A late failure: what it left behind is unknown, so ask the agent what it holds.
        log.warning("command %s %s failed after it was given up: querying the session", command_id, command.type)
        if command.session_id and command.type != AgentCommand.Type.GET_SESSION:
            command_enqueue(agent=command.agent, session=command.session, type=AgentCommand.Type.GET_SESSION)
        return
    if command.status not in AgentCommand.UNFINISHED:
        return
    if retryable and command.attempts < max_attempts and timezone.now() < command.deadline:
        command_retry_later(command=command, error=error)
        return
    AgentCommand.objects.filter(pk=command.pk).update(
        status=AgentCommand.Status.FAILED, error_message=error[:4000], completed_at=timezone.now()
    )
    log.info("command %s %s failed (execution %d): %s", command_id, command.type, execution, error[:200])
    session_services.session_on_command_failed(command=command, error=error)


@transaction.atomic
def session_event(*, agent_pk: int, channel_name: str, payload: dict) -> None:
    current_connection(agent_pk=agent_pk, channel_name=channel_name)
    session = (
        Session.objects.select_for_update().filter(pk=_uuid_or_none(payload["session_id"]), agent_id=agent_pk).first()
    )
    if session is None:
        raise NotOwnedByAgent("no such session on this agent")
    session_services.session_reconcile(session=session, reported=payload["state"], detail=payload.get("reason") or "")


def _uuid_or_none(value: str):
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        return None
