"""Reads about sessions, and the one access helper every view uses."""

from __future__ import annotations

import uuid

from sessions_app.models import Session, Template
from sessions_app.states import LIVE_STATES
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


def session_ids_live_on_agent(*, agent_pk: int) -> list[str]:
    """The ids of the agent's sessions that still hold (or may hold) something on it: what
    its garbage collector must keep."""
    return [
        str(pk) for pk in Session.objects.filter(agent_id=agent_pk, state__in=LIVE_STATES).values_list("pk", flat=True)
    ]
