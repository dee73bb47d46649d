"""The images' pinned package lists are requirements.txt's pins: an image never runs a
version the suite did not test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LISTS = ["agent_clients/requirements.txt", "images/control-plane/requirements.txt"]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line)
        assert m, f"{path.name}: not a pin: {line!r}"
        found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = line
    return found


@pytest.mark.parametrize("name", LISTS)
def test_every_pin_of_an_image_is_the_pin_of_requirements_txt(name):
    reference = pins(ROOT / "requirements.txt")
    image = pins(ROOT / name)
    assert image, f"{name} pins nothing"
    for package, line in image.items():
        assert package in reference, f"{name} pins {package}, which requirements.txt does not"
        assert line == reference[package], f"{name}: {line!r}, requirements.txt: {reference[package]!r}"


def test_the_agent_list_holds_what_the_docker_agent_imports():
    """Each third-party top-level module the Docker agent's code imports has its package in
    the list (the kubernetes agent's modules run from the control-plane image)."""
    import ast

    modules = set()
    for path in (ROOT / "agent_clients").rglob("*.py"):
        if "kubernetes" in path.name or path.name in ("k8s_agent.py", "lease.py", "k8s_manifests.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    import sys

    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in ("agent_clients", "__future__")}
    distribution = {"requests": "docker", "urllib3": "docker"}  # installed with docker==
    listed = set(pins(ROOT / "agent_clients/requirements.txt"))
    missing = {m for m in third_party if distribution.get(m, m).replace("_", "-") not in listed}
    assert not missing, f"the Docker agent imports {missing}, which agent_clients/requirements.txt lacks"
