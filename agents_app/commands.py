"""The durable command queue: write a command row, then poke its agent after commit."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from agents_app.models import Agent, AgentCommand

log = logging.getLogger(__name__)

POKE = {"type": "agent.poke"}
POKE_TIMEOUT = 1.0  # a frozen Redis must not hold up the request that wrote the command


async def _send_poke(channel_name: str) -> None:
    await asyncio.wait_for(get_channel_layer().send(channel_name, POKE), POKE_TIMEOUT)


def command_enqueue(*, agent: Agent, type: str, session=None, payload: dict | None = None) -> AgentCommand:
    """Write a pending command; its agent is poked once the surrounding transaction commits."""
    command = AgentCommand.objects.create(
        agent=agent,
        session=session,
        type=type,
        payload=payload or {},
        deadline=timezone.now() + timedelta(seconds=settings.COMMAND_TIMEOUT),
    )
    agent_pk = agent.pk
    transaction.on_commit(lambda: agent_poke(agent_pk=agent_pk))
    return command


def agent_poke(*, agent_pk: int) -> None:
    """Wake the agent's socket consumer (in whichever process holds it) to deliver pending commands.

    Safe to lose: the consumer also delivers on every heartbeat."""
    channel_name = Agent.objects.filter(pk=agent_pk).values_list("channel_name", flat=True).first()
    if not channel_name:
        return
    try:
        async_to_sync(_send_poke)(channel_name)
    except Exception:  # the layer being down must not fail the request that wrote the command
        log.warning("could not poke agent %s; it will pick the command up on its next heartbeat", agent_pk)


def command_claim_for_delivery(*, command_pk: int) -> bool:
    """pending -> sent, counted as an attempt. True only for the one caller that wins; a
    command whose retry backoff has not run out is not claimed."""
    now = timezone.now()
    return (
        AgentCommand.objects.filter(pk=command_pk, status=AgentCommand.Status.PENDING)
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .update(status=AgentCommand.Status.SENT, sent_at=now, attempts=F("attempts") + 1)
        == 1
    )


def command_retry_backoff(*, failed_execution: int) -> float:
    """Seconds before a command whose execution ``failed_execution`` failed retryably runs again."""
    base, cap = settings.COMMAND_RETRY_BACKOFF_BASE, settings.COMMAND_RETRY_BACKOFF_CAP
    return min(cap, base * 2 ** min(failed_execution - 1, 30))


def command_retry_later(*, command: AgentCommand, error: str) -> None:
    """A retryable failure: back to the queue as a fresh execution, not delivered before the backoff.

    The new execution number makes the agent run it again (its answer cache is keyed by
    command id and execution, so a redelivery of one execution is never run twice)."""
    delay = command_retry_backoff(failed_execution=command.execution)
    AgentCommand.objects.filter(pk=command.pk).update(
        status=AgentCommand.Status.PENDING,
        execution=F("execution") + 1,
        not_before=timezone.now() + timedelta(seconds=delay),
        error_message=error[:4000],
    )
    log.info(
        "command %s %s failed (execution %d, retryable): retried in %.1fs: %s",
        command.command_id,
        command.type,
        command.execution,
        delay,
        error[:200],
    )


def agents_with_due_retries() -> list[int]:
    """Agents holding a retried command whose backoff has run out (the sweep pokes them)."""
    return list(
        AgentCommand.objects.filter(status=AgentCommand.Status.PENDING, not_before__lte=timezone.now())
        .order_by()
        .values_list("agent_id", flat=True)
        .distinct()
    )


def command_requeue_unfinished(*, agent_pk: int) -> int:
    """On (re)connect: everything sent or acked but not completed goes back to pending."""
    return AgentCommand.objects.filter(
        agent_id=agent_pk, status__in=(AgentCommand.Status.SENT, AgentCommand.Status.ACKED)
    ).update(status=AgentCommand.Status.PENDING)
