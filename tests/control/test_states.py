"""The session transition table, exhaustively."""

import itertools

import pytest

from sessions_app.states import TRANSITIONS, IllegalTransition, State, can_transition, next_state

ALLOWED = {
    ("pending", "starting"), ("pending", "running"), ("pending", "failed"), ("pending", "terminating"),
    ("starting", "running"), ("starting", "failed"), ("starting", "terminating"), ("starting", "degraded"),
    ("running", "hibernating"), ("running", "hibernated"), ("running", "terminating"), ("running", "degraded"),
    ("running", "failed"),
    ("hibernating", "hibernated"), ("hibernating", "running"), ("hibernating", "failed"),
    ("hibernating", "terminating"), ("hibernating", "degraded"),
    ("hibernated", "waking"), ("hibernated", "terminating"), ("hibernated", "failed"),
    ("waking", "running"), ("waking", "hibernated"), ("waking", "failed"), ("waking", "terminating"),
    ("waking", "degraded"),
    ("degraded", "running"), ("degraded", "hibernated"), ("degraded", "terminating"), ("degraded", "failed"),
    ("terminating", "terminated"), ("terminating", "failed"),
    ("failed", "terminating"), ("failed", "terminated"),
}  # fmt: skip


@pytest.mark.parametrize("current,target", list(itertools.product(State.ALL, State.ALL)))
def test_every_pair_of_states_is_allowed_or_refused_as_the_table_says(current, target):
    if (current, target) in ALLOWED:
        assert next_state(current, target) == target
        assert can_transition(current, target)
    else:
        with pytest.raises(IllegalTransition) as exc:
            next_state(current, target)
        assert current in str(exc.value) and target in str(exc.value)
        assert not can_transition(current, target)


def test_terminated_is_final():
    assert TRANSITIONS[State.TERMINATED] == frozenset()


def test_unknown_state_is_refused():
    with pytest.raises(IllegalTransition):
        next_state("exploded", State.RUNNING)
