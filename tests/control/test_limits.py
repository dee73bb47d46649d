"""Per-session CPU and memory limits that cannot be dodged (issue 10).

Found: a CPU request so small that it rounds to no limit (``cpu=1e-10``) was accepted; the
Docker agent then ran the desktop with ``NanoCpus=0`` (no limit at all) and the quota was
charged 1e-10 cores. Now every session asks for at least SESSION_MIN_CPU cores and
SESSION_MIN_MEMORY_MB megabytes, checked here, in the template admin and again by the agents."""

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError

from agents_app.models import AgentCommand
from sessions_app import services
from sessions_app.models import Quota, Session, Template
from sessions_app.states import State
from streamspace.env import env_float
from streamspace.errors import InvalidInput

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def create(client, **body):
    body.setdefault("template", "desktop")
    return client.post("/api/v1/sessions", body, format="json")


def nothing_written():
    return Session.objects.count() == 0 and AgentCommand.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cpu": 1e-10}, "cpu"),  # the reported dodge: rounds to NanoCpus=0
        ({"cpu": 0.0004}, "cpu"),  # rounds to 0 millicores on Kubernetes
        ({"cpu": 0.05}, "cpu"),  # below the default minimum of 0.1
        ({"cpu": 0}, "cpu"),
        ({"cpu": -0.5}, "cpu"),
        ({"cpu": "NaN"}, "cpu"),
        ({"cpu": "Infinity"}, "cpu"),
        ({"cpu": 1e308}, "cpu"),
        ({"cpu": 10**400}, "cpu"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"memory_mb": 63}, "memory_mb"),
        ({"memory_mb": -64}, "memory_mb"),
        ({"memory_mb": "NaN"}, "memory_mb"),
        ({"memory_mb": 10**30}, "memory_mb"),
        ({"memory_mb": 64.5}, "memory_mb"),
    ],
)
def test_the_api_refuses_limits_that_round_away_or_are_out_of_range(as_alice, template, agent, body, field):
    response = create(as_alice, **body)
    assert response.status_code == 400, response.json()
    answer = response.json()
    assert answer["error"] == "invalid" and answer["field"] == field
    assert field.split("_")[0] in answer["detail"]
    assert nothing_written()


def test_the_refusal_names_the_allowed_range(as_alice, template, agent):
    assert create(as_alice, cpu=1e-10).json()["detail"] == "cpu must be between 0.1 and 16 cores"
    assert create(as_alice, memory_mb=32).json()["detail"] == "memory_mb must be between 64 and 65536 megabytes"


def test_a_raw_nan_in_the_json_body_is_refused_as_malformed(as_alice, template, agent):
    for literal in ("NaN", "Infinity", "-Infinity"):
        response = as_alice.post(
            "/api/v1/sessions", data=f'{{"template": "desktop", "cpu": {literal}}}', content_type="application/json"
        )
        assert response.status_code == 400
        assert response.json()["error"] == "malformed"
    assert nothing_written()


def test_the_minimum_itself_is_accepted_and_charged_as_asked(as_alice, template, agent):
    response = create(as_alice, cpu=0.1, memory_mb=64)
    assert response.status_code == 201, response.json()
    command = AgentCommand.objects.get(session_id=response.json()["id"])
    assert (command.payload["cpu"], command.payload["memory_mb"]) == (0.1, 64)


def test_the_minimum_is_a_setting(as_alice, template, agent, settings):
    settings.SESSION_MIN_CPU = 0.5
    settings.SESSION_MIN_MEMORY_MB = 256
    assert create(as_alice, cpu=0.25).json()["detail"] == "cpu must be between 0.5 and 16 cores"
    assert create(as_alice, memory_mb=128).json()["field"] == "memory_mb"
    assert nothing_written()
    assert create(as_alice, cpu=0.5, memory_mb=256).status_code == 201


def test_the_service_refuses_a_tiny_cpu_whoever_calls_it(alice, template, agent):
    """The portal and the admin call the same service as the API."""
    with pytest.raises(InvalidInput) as err:
        services.session_create(user=alice, template_slug="desktop", cpu=1e-10)
    assert err.value.field == "cpu"
    with pytest.raises(InvalidInput) as err:
        services.session_create(user=alice, template_slug="desktop", cpu=float("nan"))
    assert err.value.field == "cpu"
    with pytest.raises(InvalidInput) as err:
        services.session_create(user=alice, template_slug="desktop", memory_mb=True)
    assert err.value.field == "memory_mb"
    assert nothing_written()


def test_a_template_with_defaults_below_the_minimum_fails_model_validation(db):
    tiny = Template(slug="tiny", name="Tiny", image="img:1", default_cpu=1e-10, default_memory_mb=16)
    with pytest.raises(ValidationError) as err:
        tiny.full_clean()
    assert set(err.value.message_dict) == {"default_cpu", "default_memory_mb"}
    Template(slug="ok", name="Ok", image="img:1", default_cpu=0.1, default_memory_mb=64).full_clean()


def test_a_template_with_sound_refuses_a_platform_without_sound_and_the_sound_port_for_vnc(db):
    """Kubernetes agents carry no sound, and the desktop serves sound on 5711 (the Docker
    agent would publish one port for both)."""
    k8s = Template(slug="k8s", name="K8s", image="img:1", sound=True, platform="kubernetes")
    with pytest.raises(ValidationError) as err:
        k8s.full_clean()
    assert set(err.value.message_dict) == {"sound"}
    clash = Template(slug="clash", name="Clash", image="img:1", sound=True, vnc_port=5711)
    with pytest.raises(ValidationError) as err:
        clash.full_clean()
    assert set(err.value.message_dict) == {"vnc_port"}
    Template(slug="k8s-silent", name="K8s", image="img:1", platform="kubernetes", vnc_port=5711).full_clean()
    Template(slug="docker", name="Docker", image="img:1", sound=True, platform="docker").full_clean()


def test_the_template_admin_refuses_defaults_below_the_minimum(admin_client):
    form = {
        "slug": "tiny", "name": "Tiny", "description": "", "image": "img:1", "vnc_port": "5901",
        "default_cpu": "1e-10", "default_memory_mb": "1024", "env": "{}", "volume_mount_path": "/home/user",
        "enabled": "on", "platform": "", "region": "", "egress": "internet", "egress_allow": "[]",
    }  # fmt: skip
    response = admin_client.post("/admin/sessions_app/template/add/", form)
    assert response.status_code == 200
    assert "cpu must be between 0.1 and 16 cores" in response.content.decode()
    assert not Template.objects.filter(slug="tiny").exists()
    response = admin_client.post("/admin/sessions_app/template/add/", {**form, "default_cpu": "0.25"})
    assert response.status_code == 302
    assert Template.objects.get(slug="tiny").default_cpu == 0.25


def test_a_template_stored_with_a_tiny_default_cannot_start_sessions(as_alice, template, agent):
    """A row written before the check (or by SQL) is refused at create, not passed on."""
    Template.objects.filter(pk=template.pk).update(default_cpu=1e-10)
    response = create(as_alice)
    assert response.status_code == 400 and response.json()["field"] == "cpu"
    assert nothing_written()


def test_the_quota_charges_an_old_sub_minimum_session_at_least_the_minimum(as_alice, alice, template, agent):
    """A session stored before the minimum existed (cpu 1e-10) counted as almost nothing
    against the quota; it is charged the minimum now."""
    Quota.objects.create(user=alice, max_sessions=5, max_cpu=1, max_memory_mb=8192)
    Session.objects.create(owner=alice, template=template, agent=agent, cpu=1e-10, memory_mb=1, state=State.RUNNING)
    response = create(as_alice, cpu=1, memory_mb=1024)
    assert response.status_code == 403, response.json()
    assert response.json()["detail"] == "your quota allows 1 CPU; 0.1 in use, 1 asked"
    assert create(as_alice, cpu=0.9, memory_mb=1024).status_code == 201


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "-0.5", "0", "junk", "0.0001", "1e400"])
def test_the_minimum_cpu_setting_refuses_junk(monkeypatch, raw):
    monkeypatch.setenv("SESSION_MIN_CPU", raw)
    with pytest.raises(ImproperlyConfigured, match="SESSION_MIN_CPU"):
        env_float("SESSION_MIN_CPU", 0.1, minimum=0.001, maximum=1024)


def test_the_control_plane_refuses_to_start_with_a_junk_minimum(tmp_path):
    for env, words in (
        ({"SESSION_MIN_CPU": "nan"}, "SESSION_MIN_CPU"),
        ({"SESSION_MIN_MEMORY_MB": "0"}, "SESSION_MIN_MEMORY_MB"),
        ({"SESSION_MIN_CPU": "32"}, "SESSION_MIN_CPU"),  # above SESSION_MAX_CPU (16)
    ):
        done = subprocess.run(
            [sys.executable, "manage.py", "check"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "streamspace.settings",
                 "STREAMSPACE_VAR_DIR": str(tmp_path), **env},
        )  # fmt: skip
        assert done.returncode != 0
        assert words in done.stderr.splitlines()[-1], done.stderr[-500:]
