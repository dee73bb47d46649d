"""Reads about sessions, and the one access helper every view uses."""

from __future__ import annotations

import uuid

from sessions_app.models import Session, Template
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
