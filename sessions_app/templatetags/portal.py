"""Small template helpers for the portal: which actions a session's state allows."""

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
