"""Periodic sweeps. Each is safe to run from several workers at once: every change is a
conditional update (or a row locked with SKIP LOCKED), so two sweepers never apply the
same change twice."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from agents_app.commands import agent_poke, agents_with_due_retries, command_enqueue
from agents_app.models import Agent, AgentCommand
from agents_app.selectors import agent_liveness_cutoff
from sessions_app import services as session_services
from sessions_app.models import Session
from sessions_app.states import TRANSITIONAL_STATES, State

log = logging.getLogger(__name__)


def sweep_silent_agents() -> dict:
    """Agents silent for AGENT_MISSED_HEARTBEATS intervals go offline; their running sessions degrade."""
    cutoff = agent_liveness_cutoff()
    went_offline = Agent.objects.filter(
        status__in=(Agent.Status.ONLINE, Agent.Status.DRAINING), last_heartbeat__lt=cutoff
    ).update(status=Agent.Status.OFFLINE, updated_at=timezone.now())
    degraded = 0
    with transaction.atomic():
        sessions = Session.objects.select_for_update(skip_locked=True, of=("self",)).filter(
            state=State.RUNNING, agent__status=Agent.Status.OFFLINE
        )
        for session in sessions.select_related("agent"):
            session_services.session_degrade(
                session=session, reason=f"agent {session.agent.agent_id} stopped sending heartbeats"
            )
            degraded += 1
    if went_offline or degraded:
        log.warning("sweep: %d agents went offline, %d sessions degraded", went_offline, degraded)
    return {"agents_offline": went_offline, "sessions_degraded": degraded}


def sweep_commands() -> dict:
    """Unacknowledged commands are redelivered (up to COMMAND_MAX_ATTEMPTS, then failed);
    commands past their deadline time out. Either way the session learns why. Agents with a
    retry whose backoff ran out are poked so it goes out now."""
    now = timezone.now()
    redelivered = failed = timed_out = 0
    to_poke: set[int] = set()
    ack_cutoff = now - timedelta(seconds=settings.COMMAND_ACK_TIMEOUT)
    with transaction.atomic():
        unacked = AgentCommand.objects.select_for_update(skip_locked=True).filter(
            status=AgentCommand.Status.SENT, sent_at__lt=ack_cutoff, deadline__gte=now
        )
        for command in unacked.select_related("agent"):
            if command.attempts < settings.COMMAND_MAX_ATTEMPTS:
                AgentCommand.objects.filter(pk=command.pk, status=AgentCommand.Status.SENT).update(
                    status=AgentCommand.Status.PENDING
                )
                redelivered += 1
                to_poke.add(command.agent_id)
            else:
                error = (
                    f"agent {command.agent.agent_id} did not acknowledge {command.type.replace('_', ' ')} "
                    f"after {command.attempts} attempts"
                )
                _finish(command, AgentCommand.Status.FAILED, error, now)
                failed += 1
        overdue = AgentCommand.objects.select_for_update(skip_locked=True).filter(
            status__in=AgentCommand.UNFINISHED, deadline__lt=now
        )
        for command in overdue:
            seconds = int((command.deadline - command.created_at).total_seconds())
            _finish(command, AgentCommand.Status.TIMED_OUT, f"no answer from the agent within {seconds} s", now)
            timed_out += 1
    # Retries whose backoff ran out: poke their agents (the heartbeat delivers them too).
    to_poke.update(agents_with_due_retries())
    for agent_pk in to_poke:
        agent_poke(agent_pk=agent_pk)
    if redelivered or failed or timed_out:
        log.warning("sweep: %d commands redelivered, %d failed, %d timed out", redelivered, failed, timed_out)
    return {"redelivered": redelivered, "failed": failed, "timed_out": timed_out}


def _finish(command: AgentCommand, status: str, error: str, now) -> None:
    AgentCommand.objects.filter(pk=command.pk, status__in=AgentCommand.UNFINISHED).update(
        status=status, error_message=error, completed_at=now
    )
    if command.type != AgentCommand.Type.GET_SESSION:
        session_services.session_on_command_failed(command=command, error=error)


def sweep_stuck_sessions() -> dict:
    """Sessions stuck in a transitional state with no command in flight are re-queried."""
    cutoff = timezone.now() - timedelta(seconds=settings.SESSION_STUCK_AFTER)
    in_flight = AgentCommand.objects.filter(session=OuterRef("pk"), status__in=AgentCommand.UNFINISHED)
    queried = 0
    with transaction.atomic():
        stuck = (
            Session.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(state__in=TRANSITIONAL_STATES, state_changed_at__lt=cutoff, agent__isnull=False)
            .exclude(Exists(in_flight))
            .select_related("agent")
        )
        for session in stuck:
            command_enqueue(agent=session.agent, session=session, type=AgentCommand.Type.GET_SESSION)
            queried += 1
    if queried:
        log.warning("sweep: re-queried %d stuck sessions", queried)
    return {"requeried": queried}
