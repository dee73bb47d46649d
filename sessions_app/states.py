"""The session state machine: one transition table, and the one function that applies it."""

from __future__ import annotations


class State:
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    WAKING = "waking"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"
    DEGRADED = "degraded"

    ALL = (PENDING, STARTING, RUNNING, HIBERNATING, HIBERNATED, WAKING, TERMINATING, TERMINATED, FAILED, DEGRADED)


S = State

# current state -> states it may move to. Anything else is an IllegalTransition.
TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.STARTING, S.RUNNING, S.FAILED, S.TERMINATING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.TERMINATING, S.DEGRADED}),
    # running -> hibernated: the agent reports the desktop stopped with its home kept (a late hibernate).
    S.RUNNING: frozenset({S.HIBERNATING, S.HIBERNATED, S.TERMINATING, S.DEGRADED, S.FAILED}),
    S.HIBERNATING: frozenset({S.HIBERNATED, S.RUNNING, S.FAILED, S.TERMINATING, S.DEGRADED}),
    S.HIBERNATED: frozenset({S.WAKING, S.TERMINATING, S.FAILED}),
    S.WAKING: frozenset({S.RUNNING, S.HIBERNATED, S.FAILED, S.TERMINATING, S.DEGRADED}),
    S.DEGRADED: frozenset({S.RUNNING, S.HIBERNATED, S.TERMINATING, S.FAILED}),
    S.TERMINATING: frozenset({S.TERMINATED, S.FAILED}),
    S.FAILED: frozenset({S.TERMINATING, S.TERMINATED}),
    S.TERMINATED: frozenset(),
}

# Sessions that still hold (or may hold) something on an agent.
LIVE_STATES = frozenset(set(State.ALL) - {S.TERMINATED, S.FAILED})
# Sessions whose processes run, and so consume CPU and memory.
CONSUMING_STATES = frozenset(LIVE_STATES - {S.HIBERNATED})
# States that wait for an agent's answer; a session stuck in one is re-queried.
TRANSITIONAL_STATES = frozenset({S.PENDING, S.STARTING, S.HIBERNATING, S.WAKING, S.TERMINATING})


class IllegalTransition(Exception):
    def __init__(self, current: str, target: str):
        super().__init__(f"a session cannot go from {current} to {target}")
        self.current = current
        self.target = target


def next_state(current: str, target: str) -> str:
    """Return ``target`` if the table allows ``current -> target``; raise otherwise."""
    if current not in TRANSITIONS:
        raise IllegalTransition(current, target)
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)
    return target


def can_transition(current: str, target: str) -> bool:
    return target in TRANSITIONS.get(current, frozenset())
