"""Kubernetes resource quantities never round to "0" and never go below the agent's
minimum (issue 10).

Found: the manifest builder took any cpu above 0.0005 cores (0.05 became "50m", far
below what the control plane allows) and ``True`` as one core and one MiB (a bool is an
int in Python). It now refuses anything below the agent's minimum (SESSION_MIN_CPU /
SESSION_MIN_MEMORY_MB, default 0.1 cores and 64 MiB), and no quantity it writes is zero."""

from __future__ import annotations

import pytest

from agent_clients.backends import k8s_manifests as m
from agent_clients.backends.base import BackendError
from tests.k8s.test_manifests import spec


def resources(s, **kw):
    deployment = m.make_all(s, "a", "ns", **kw)[-1]
    return deployment["spec"]["template"]["spec"]["containers"][0]["resources"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu", 1e-10),
        ("cpu", 0.0005),
        ("cpu", 0.05),
        ("cpu", float("inf")),
        ("cpu", True),
        ("memory_mb", 0),
        ("memory_mb", 32),
        ("memory_mb", True),
    ],
)
def test_limits_below_the_minimum_are_refused(field, value):
    with pytest.raises(BackendError) as err:
        m.make_all(spec(**{field: value}), "a", "ns")
    assert err.value.retryable is False
    assert ("cpu" if field == "cpu" else "memory") in err.value.message


def test_the_quantities_are_the_ones_asked_for():
    got = resources(spec(cpu=0.1, memory_mb=64))
    assert got["requests"] == got["limits"] == {"cpu": "100m", "memory": "64Mi"}
    assert resources(spec(cpu=1.001, memory_mb=100))["limits"] == {"cpu": "1001m", "memory": "100Mi"}


def test_a_lower_minimum_still_never_writes_zero():
    got = resources(spec(cpu=0.0015, memory_mb=16), min_cpu=0.001, min_memory_mb=16)
    assert got["limits"] == {"cpu": "2m", "memory": "16Mi"}


def test_the_minimum_is_the_agents_setting():
    with pytest.raises(BackendError, match=r"cpu must be at least 0\.5"):
        m.make_all(spec(cpu=0.25), "a", "ns", min_cpu=0.5)
    with pytest.raises(BackendError, match="memory must be between 256 MiB"):
        m.make_all(spec(memory_mb=128), "a", "ns", min_memory_mb=256)
