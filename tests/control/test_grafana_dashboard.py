"""deploy/grafana/streamspace.json is a dashboard Grafana can import, and every query in
it names a series that /metrics or an agent's metrics port exports (a renamed series
would leave an empty panel nobody notices)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent_clients.runtime.metrics import AgentMetrics
from streamspace.metrics import REGISTRY

pytestmark = pytest.mark.django_db

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "streamspace.json"
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum")


def exported() -> set[str]:
    names = set()
    for registry in (REGISTRY, AgentMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES)
    return names


def test_the_dashboard_is_valid_json_and_queries_only_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and dashboard["uid"]
    used = {name for expr in exprs for name in re.findall(r"\bstreamspace_[a-z_]+", expr)}
    assert used - exported() == set()
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    # every control-plane family appears on the dashboard
    assert {family.name for family in REGISTRY.collect()} - families == set()
