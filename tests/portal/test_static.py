"""Every static file the templates name is found, noVNC's module graph included, and served."""

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders

TEMPLATES = Path(settings.BASE_DIR) / "templates"
STATIC_TAG = re.compile(r"""{%\s*static\s+['"]([^'"]+)['"]\s*%}""")
JS_IMPORT = re.compile(
    r"""(?:^|\n)\s*(?:import|export)\s[^'";]*?from\s*['"](\.{1,2}/[^'"]+)['"]|import\s*['"](\.{1,2}/[^'"]+)['"]"""
)


def static_paths_in_templates() -> set[str]:
    return {m for f in TEMPLATES.rglob("*.html") for m in STATIC_TAG.findall(f.read_text())}


def test_templates_name_static_files():
    assert {"css/portal.css", "js/sessions.js", "js/viewer.js", "novnc/core/rfb.js"} <= static_paths_in_templates()


@pytest.mark.parametrize("path", sorted(static_paths_in_templates()))
def test_every_static_path_resolves(path):
    assert finders.find(path), f"{path} is named in a template but no finder has it"


def test_novnc_is_the_pinned_version():
    package = Path(finders.find("novnc/package.json")).read_text()
    assert '"version": "1.7.0"' in package


def test_novncs_module_graph_is_complete():
    """Every relative import reachable from rfb.js is a file the static finders serve."""
    todo, seen = ["novnc/core/rfb.js"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found = finders.find(path)
        assert found, f"{path} (imported by noVNC) is missing"
        for a, b in JS_IMPORT.findall(Path(found).read_text()):
            target = (Path(path).parent / (a or b)).as_posix()
            todo.append(str(Path(*_normalise(target.split("/")))))
    assert len(seen) > 10


def _normalise(parts):
    out = []
    for part in parts:
        if part == "..":
            out.pop()
        elif part not in (".", ""):
            out.append(part)
    return out


@pytest.mark.parametrize("path", ["/static/novnc/core/rfb.js", "/static/js/viewer.js", "/static/js/sessions.js"])
def test_scripts_are_served_as_javascript(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] in ("text/javascript", "application/javascript")
