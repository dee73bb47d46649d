"""Lifecycle policies: idle timeout (on real input), no-viewer timeout, maximum lifetime.

The policy of a session is resolved field by field: a group of its owner that sets the
field (several: the most lenient, 0 = off first, and hibernate before terminate), else its
template, else the environment (``SESSION_IDLE_TIMEOUT``, ``SESSION_IDLE_ACTION``,
``SESSION_MAX_LIFETIME``, ``SESSION_NO_VIEWER_TIMEOUT``). Durations are seconds, 0 = off.

- Idle: no key or pointer event through the relay (``Session.last_activity``, written by
  the viewer socket at most every SESSION_ACTIVITY_INTERVAL, so input may be that much
  newer than the last write) nor a "Stay" (keepalive) for the idle timeout, counted from
  when the session last became running. The sweep first warns (``idle_warned_at``: the open
  viewer shows "Still there?"), and acts no sooner than SESSION_IDLE_WARNING later (at most
  half the timeout); input or a keepalive clears the warning.
- No viewer: no viewer connection open for the timeout (no warning: nobody to show it to).
- Maximum lifetime: terminated that long after it first ran, busy or not, hibernated too.

``sweep_lifecycle`` is safe from several workers at once: each session is re-read under
``SELECT ... FOR UPDATE SKIP LOCKED`` and the step decided again on the locked row, so a
second sweeper finds it moved on; every action goes through the session services (a
compare-and-swap on the state) and lands on the timeline with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from sessions_app import services
from sessions_app.models import GroupPolicy, Session, Template
from sessions_app.states import State

log = logging.getLogger(__name__)

HIBERNATE, TERMINATE = "hibernate", "terminate"
DURATIONS = ("idle_timeout", "max_lifetime", "no_viewer_timeout")
SWEPT_STATES = (State.RUNNING, State.HIBERNATED)


@dataclass(frozen=True)
class Policy:
    idle_timeout: float
    idle_action: str
    max_lifetime: float
    no_viewer_timeout: float

    @property
    def warning(self) -> float:
        """Seconds of warning before an idle action (and before the end of the lifetime)."""
        return min(settings.SESSION_IDLE_WARNING, self.idle_timeout / 2)


@dataclass(frozen=True)
class Step:
    """What the policy asks for a session now: ``warn`` (the idle warning is due and not
    yet given), ``hibernate`` or ``terminate`` (with the reason for the timeline)."""

    kind: str
    reason: str = ""


def _lenient(values: list[int]) -> int:
    return 0 if 0 in values else max(values)


def policy_for(*, template: Template, owner_id: int) -> Policy:
    groups = list(GroupPolicy.objects.filter(group__user__id=owner_id))
    resolved = {}
    for name in DURATIONS:
        overrides = [getattr(g, name) for g in groups if getattr(g, name) is not None]
        if overrides:
            resolved[name] = float(_lenient(overrides))
        elif getattr(template, name) is not None:
            resolved[name] = float(getattr(template, name))
        else:
            resolved[name] = float(getattr(settings, f"SESSION_{name.upper()}"))
    actions = {g.idle_action for g in groups if g.idle_action}
    if actions:
        resolved["idle_action"] = HIBERNATE if HIBERNATE in actions else TERMINATE
    else:
        resolved["idle_action"] = template.idle_action or settings.SESSION_IDLE_ACTION
    return Policy(**resolved)


def human_duration(seconds: float) -> str:
    """``90`` -> "1 min 30 s", ``1800`` -> "30 min", ``28800`` -> "8 h"."""
    total = round(seconds)
    parts = []
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if total >= size:
            parts.append(f"{total // size} {unit}")
            total %= size
    return " ".join(parts) or "0 s"


def _past(action: str) -> str:
    return "hibernated" if action == HIBERNATE else "terminated"


# --- when ------------------------------------------------------------------------------


def idle_deadline(session: Session, policy: Policy) -> datetime | None:
    """When the running session counts as idle for its timeout (None: no idle timeout)."""
    if not policy.idle_timeout or session.state != State.RUNNING:
        return None
    since = session.state_changed_at
    if session.last_activity is not None:
        # Input between two writes of the relay is at most one interval newer than the last.
        since = max(since, session.last_activity + timedelta(seconds=settings.SESSION_ACTIVITY_INTERVAL))
    return since + timedelta(seconds=policy.idle_timeout)


def _warning_valid(session: Session, policy: Policy, deadline: datetime) -> bool:
    """A warning given for this idle period (not one left from before a policy change)."""
    warned = session.idle_warned_at
    return warned is not None and warned >= deadline - timedelta(seconds=policy.warning) - timedelta(seconds=1)


def idle_action_at(session: Session, policy: Policy) -> datetime | None:
    """When the idle action happens, once warned: never sooner than the warning's length after it."""
    deadline = idle_deadline(session, policy)
    if deadline is None or not _warning_valid(session, policy, deadline):
        return None
    return max(deadline, session.idle_warned_at + timedelta(seconds=policy.warning))


def lifetime_end(session: Session, policy: Policy) -> datetime | None:
    if not policy.max_lifetime or session.started_at is None:
        return None
    return session.started_at + timedelta(seconds=policy.max_lifetime)


def next_step(session: Session, policy: Policy, *, now: datetime, viewers_open: int, last_viewer_closed) -> Step | None:
    if session.state not in SWEPT_STATES:
        return None
    end = lifetime_end(session, policy)
    if end is not None and now >= end:
        return Step(TERMINATE, f"terminated after {human_duration(policy.max_lifetime)}, its maximum lifetime")
    if session.state != State.RUNNING:
        return None
    deadline = idle_deadline(session, policy)
    if deadline is not None:
        act_at = idle_action_at(session, policy)
        if act_at is not None and now >= act_at:
            action = policy.idle_action
            return Step(action, f"{_past(action)} after {human_duration(policy.idle_timeout)} without input")
        if act_at is None and now >= deadline - timedelta(seconds=policy.warning):
            return Step("warn")
    if policy.no_viewer_timeout and not viewers_open:
        since = max(session.state_changed_at, last_viewer_closed or session.state_changed_at)
        if now >= since + timedelta(seconds=policy.no_viewer_timeout):
            action = policy.idle_action
            return Step(action, f"{_past(action)} after {human_duration(policy.no_viewer_timeout)} with no viewer open")
    return None


# --- what the viewer shows -------------------------------------------------------------


def session_warning(session: Session, *, now: datetime | None = None, policies: dict | None = None) -> dict | None:
    """The warning the open viewer shows, or None: the idle action once the sweep warned
    (the user can stay), or the end of the maximum lifetime when it is near (they cannot)."""
    if session.state != State.RUNNING:
        return None
    now = now or timezone.now()
    key = (session.template_id, session.owner_id)
    policies = {} if policies is None else policies
    if key not in policies:
        policies[key] = policy_for(template=session.template, owner_id=session.owner_id)
    policy = policies[key]
    end = lifetime_end(session, policy)
    if end is not None and now >= end - timedelta(seconds=min(settings.SESSION_IDLE_WARNING, policy.max_lifetime / 2)):
        return {
            "action": TERMINATE,
            "at": end,
            "seconds_left": max(0.0, (end - now).total_seconds()),
            "detail": f"This session reaches its maximum lifetime of {human_duration(policy.max_lifetime)}.",
            "can_stay": False,
        }
    act_at = idle_action_at(session, policy)
    if act_at is not None:
        return {
            "action": policy.idle_action,
            "at": act_at,
            "seconds_left": max(0.0, (act_at - now).total_seconds()),
            "detail": "No key or mouse input for a while.",
            "can_stay": True,
        }
    return None


def viewer_watch_ms(session: Session) -> int:
    """How often the open viewer looks at its session: often enough to show any warning
    (a third of the warning's length), between 1 and 5 s."""
    policy = policy_for(template=session.template, owner_id=session.owner_id)
    warnings = [policy.warning] if policy.idle_timeout else []
    if policy.max_lifetime:
        warnings.append(min(settings.SESSION_IDLE_WARNING, policy.max_lifetime / 2))
    return int(min(5000, max(1000, min(warnings, default=15) * 1000 / 3)))


# --- the sweep -------------------------------------------------------------------------


def _policies_exist() -> bool:
    if any(getattr(settings, f"SESSION_{name.upper()}") for name in DURATIONS):
        return True
    some = Q()
    for name in DURATIONS:
        some |= Q(**{f"{name}__gt": 0})
    return Template.objects.filter(some).exists() or GroupPolicy.objects.filter(some).exists()


# A viewer is the desktop's own socket: the sound socket (stream "audio") alone shows
# nobody watching, so it never holds off the no-viewer timeout.
VIEWER_STREAM = "vnc"


def _viewers(session: Session) -> tuple[int, datetime | None]:
    facts = session.vnc_connections.filter(stream=VIEWER_STREAM).aggregate(
        open=Count("pk", filter=Q(closed_at__isnull=True)), last=Max("closed_at")
    )
    return facts["open"], facts["last"]


def sweep_lifecycle() -> dict:
    """Warn, hibernate or terminate the sessions their policy says (see the module's docstring)."""
    done = {"warned": 0, HIBERNATE: 0, TERMINATE: 0}
    if not _policies_exist():
        return done
    now = timezone.now()
    policies: dict[tuple[int, int], Policy] = {}
    viewer = {"vnc_connections__stream": VIEWER_STREAM}
    candidates = (
        Session.objects.filter(state__in=SWEPT_STATES)
        .select_related("template")
        .annotate(
            viewers_open=Count("vnc_connections", filter=Q(vnc_connections__closed_at__isnull=True, **viewer)),
            last_viewer_closed=Max("vnc_connections__closed_at", filter=Q(**viewer)),
        )
    )
    for session in candidates:
        key = (session.template_id, session.owner_id)
        if key not in policies:
            policies[key] = policy_for(template=session.template, owner_id=session.owner_id)
        policy = policies[key]
        step = next_step(session, policy, now=now, viewers_open=session.viewers_open,
                         last_viewer_closed=session.last_viewer_closed)  # fmt: skip
        if step is not None and _apply(session.pk, policy, now):
            done[step.kind if step.kind != "warn" else "warned"] += 1
    if done[HIBERNATE] or done[TERMINATE]:
        log.info("lifecycle sweep: %s", done)
    return done


@transaction.atomic
def _apply(session_pk, policy: Policy, now: datetime) -> bool:
    """Decide again on the locked row (another sweeper may have acted), then act; True if done."""
    session = (
        Session.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("template", "agent")
        .filter(pk=session_pk)
        .first()
    )
    if session is None:
        return False
    now = max(now, timezone.now())  # decided and stamped when locked: a long sweep shortens no warning
    viewers_open, last_closed = _viewers(session)
    step = next_step(session, policy, now=now, viewers_open=viewers_open, last_viewer_closed=last_closed)
    if step is None:
        return False
    if step.kind == "warn":
        return (
            Session.objects.filter(pk=session.pk, state=State.RUNNING, idle_warned_at=session.idle_warned_at).update(
                idle_warned_at=now
            )
            == 1
        )
    if step.kind == HIBERNATE and session.agent_id is None:
        return False  # nothing to stop it on; the agent sweeps settle such sessions
    if step.kind == HIBERNATE:
        services.session_hibernate(session=session, policy_reason=step.reason)
    else:
        services.session_terminate(session=session, policy_reason=step.reason)
    log.info("session %s: %s", session.pk, step.reason)
    return True
