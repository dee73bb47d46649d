"""Reads about sessions, and the one access helper every view uses."""

from __future__ import annotations

import uuid

from sessions_app.models import Session, Template
from sessions_app.states import LIVE_STATES, State
from streamspace.errors import NotFound


def sessions_visible_to(user):
    qs = Session.objects.select_related("owner", "template", "agent")
    return qs if user.is_staff else qs.filter(owner=user)


def session_get_for_user(*, user, session_id) -> Session:
    """The session if ``user`` owns it or is staff; NotFound otherwise (others' sessions do not exist)."""
    try:
        pk = session_id if isinstance(session_id, uuid.UUID) else uuid.UUID(str(session_id))
    except ValueError:
        raise NotFound("no such session") from None
    session = sessions_visible_to(user).filter(pk=pk).first()
    if session is None:
        raise NotFound("no such session")
    return session


def templates_enabled():
    return Template.objects.filter(enabled=True).order_by("name")


def session_gc_verdicts(*, agent_pk: int, session_ids) -> dict[str, list[str]]:
    """What the agent's garbage collector may do with the objects it found of ``session_ids``.

    Only sessions this control plane knows as this agent's get a verdict; any other id (never
    heard of: another install's session on a shared host, or another agent's session) is in
    no list, and the collector leaves its objects alone.

    - live: a live state (LIVE_STATES): keep everything.
    - remove_keep_home: failed after it had run (its home may hold the user's work: the
      user's Terminate removes it with the session's keep_home), or terminated with
      keep_home: the container and network go, the home volume stays.
    - remove: failed before it ever ran (a failed create), or terminated without keep_home.
    """
    asked: dict[uuid.UUID, str] = {}  # each verdict names the id as the agent spelt it
    for sid in session_ids:
        try:
            asked[uuid.UUID(str(sid))] = sid
        except ValueError:
            continue  # not an id this control plane makes: unknown
    verdicts: dict[str, list[str]] = {"live": [], "remove": [], "remove_keep_home": []}
    rows = Session.objects.filter(agent_id=agent_pk, pk__in=asked).values_list("pk", "state", "started_at", "keep_home")
    for pk, state, started_at, keep_home in rows:
        if state in LIVE_STATES:
            verdict = "live"
        elif state == State.FAILED:
            verdict = "remove" if started_at is None else "remove_keep_home"
        else:  # terminated
            verdict = "remove_keep_home" if keep_home else "remove"
        verdicts[verdict].append(asked[pk])
    return verdicts
