"""The durable command queue: write a command row, then poke its agent after commit."""

from __future__ import annotations

import logging
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from agents_app.models import Agent, AgentCommand

log = logging.getLogger(__name__)

POKE = {"type": "agent.poke"}


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
        async_to_sync(get_channel_layer().send)(channel_name, POKE)
    except Exception:  # the layer being down must not fail the request that wrote the command
        log.warning("could not poke agent %s; it will pick the command up on its next heartbeat", agent_pk)


def command_claim_for_delivery(*, command_pk: int) -> bool:
    """pending -> sent, counted as an attempt. True only for the one caller that wins."""
    return (
        AgentCommand.objects.filter(pk=command_pk, status=AgentCommand.Status.PENDING).update(
            status=AgentCommand.Status.SENT, sent_at=timezone.now(), attempts=F("attempts") + 1
        )
        == 1
    )


def command_requeue_unfinished(*, agent_pk: int) -> int:
    """On (re)connect: everything sent or acked but not completed goes back to pending."""
    return AgentCommand.objects.filter(
        agent_id=agent_pk, status__in=(AgentCommand.Status.SENT, AgentCommand.Status.ACKED)
    ).update(status=AgentCommand.Status.PENDING)
