"""Small template helpers for the portal: which actions a session's state allows, and
which session (in which state) a flash message is about."""

from django import template

from sessions_app.states import TRANSITIONAL_STATES, State, can_transition

register = template.Library()

# action -> the state it moves a session to (the transition table decides what is allowed)
_TARGETS = {"hibernate": State.HIBERNATING, "wake": State.WAKING, "terminate": State.TERMINATING}


@register.filter
def session_can(session, action: str) -> bool:
    """Whether the portal offers ``action`` ("open", "hibernate", "wake", "terminate") for this session."""
    if action == "open":
        return session.state == State.RUNNING
    return action in _TARGETS and can_transition(session.state, _TARGETS[action])


@register.filter
def state_is_transitional(state: str) -> bool:
    return state in TRANSITIONAL_STATES


def session_message_tag(session) -> str:
    """The ``extra_tags`` of a message about ``session`` in its current state."""
    return f"session:{session.pk}:{session.state}"


@register.filter
def message_session(message) -> dict | None:
    """{"id", "state"} of the session a message is about (``session_message_tag``), or None:
    the page's script removes the message once that session is in another state."""
    kind, _, rest = (message.extra_tags or "").partition(":")
    session_id, _, state = rest.partition(":")
    return {"id": session_id, "state": state} if kind == "session" and state else None
