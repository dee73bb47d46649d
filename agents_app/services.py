"""Writes about agents: registration, tokens, the socket lifecycle, and command answers."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid

from django.db import transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from agent_clients import protocol
from agents_app import selectors
from agents_app.commands import command_requeue_unfinished
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


def agent_attach(*, agent_pk: int, channel_name: str) -> str:
    """Record the socket that now serves this agent; return the channel of the one it replaces."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(pk=agent_pk)
        previous = agent.channel_name
        agent.channel_name = channel_name
        agent.save(update_fields=["channel_name", "updated_at"])
    return previous if previous != channel_name else ""


def agent_detach(*, agent_pk: int, channel_name: str) -> None:
    """Forget the socket, unless a newer one has replaced it already. Liveness is left to
    heartbeats: a quick reconnect does not degrade anyone's session."""
    Agent.objects.filter(pk=agent_pk, channel_name=channel_name).update(channel_name="", updated_at=timezone.now())


@transaction.atomic
def agent_hello(*, agent_pk: int, payload: dict) -> None:
    """The agent (re)connected: update what it is, reconcile what it holds, requeue unfinished commands."""
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
    held = Session.objects.select_for_update().filter(
        agent_id=agent_pk, state__in=(State.RUNNING, State.DEGRADED, State.HIBERNATED)
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


def agent_heartbeat(*, agent_pk: int, payload: dict) -> None:
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


@transaction.atomic
def command_ack(*, agent_pk: int, command_id: str) -> None:
    command = _own_command(agent_pk, command_id)
    if command.status not in (AgentCommand.Status.SENT, AgentCommand.Status.PENDING):
        return  # a late or repeated ack changes nothing
    AgentCommand.objects.filter(pk=command.pk).update(status=AgentCommand.Status.ACKED, acked_at=timezone.now())
    if command.type == AgentCommand.Type.CREATE_SESSION and command.session_id:
        session_services.session_on_create_acked(command=command)


@transaction.atomic
def command_complete(*, agent_pk: int, command_id: str, result: dict) -> None:
    command = _own_command(agent_pk, command_id)
    if command.status not in AgentCommand.UNFINISHED:
        return  # already finished: a redelivered answer is ignored
    AgentCommand.objects.filter(pk=command.pk).update(
        status=AgentCommand.Status.COMPLETED, result=result, completed_at=timezone.now()
    )
    session_services.session_on_command_completed(command=command, result=result)


@transaction.atomic
def command_fail(*, agent_pk: int, command_id: str, error: str, retryable: bool, max_attempts: int) -> None:
    command = _own_command(agent_pk, command_id)
    if command.status not in AgentCommand.UNFINISHED:
        return
    if retryable and command.attempts < max_attempts and timezone.now() < command.deadline:
        # Back to the queue; delivered again on the agent's next heartbeat.
        AgentCommand.objects.filter(pk=command.pk).update(status=AgentCommand.Status.PENDING, error_message=error)
        return
    AgentCommand.objects.filter(pk=command.pk).update(
        status=AgentCommand.Status.FAILED, error_message=error[:4000], completed_at=timezone.now()
    )
    session_services.session_on_command_failed(command=command, error=error)


@transaction.atomic
def session_event(*, agent_pk: int, payload: dict) -> None:
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
