"""Agent settings from flags, the environment, and ``NAME_FILE`` (issue 9, item 18).

Found: the README says any variable may be read from the file named by ``NAME_FILE``
(Docker and Kubernetes secrets), but ``AGENT_TOKEN_FILE`` and the rest were ignored by
the agent, which then refused to start ("AGENT_TOKEN is required")."""

import pytest

from agent_clients.config import _SETTINGS, ConfigError, parse_config
from agents_app.models import Agent
from agents_app.services import agent_register
from tests.live import agent_process, wait_for

REQUIRED = {"AGENT_ID": "a-1", "CONTROL_PLANE_URL": "ws://127.0.0.1:1", "AGENT_TOKEN": "ssa_x"}

# A valid value for each setting, as text in a file, and what the config holds then.
SAMPLES = {
    "agent_id": ("agent-from-file", "agent-from-file"),
    "control_plane_url": ("wss://cp.example.com", "wss://cp.example.com"),
    "token": ("ssa_secret-from-file", "ssa_secret-from-file"),
    "backend": ("kubernetes", "kubernetes"),
    "region": ("eu-west", "eu-west"),
    "heartbeat_interval": ("2.5", 2.5),
    "reconnect_cap": ("7", 7.0),
    "max_sessions": ("12", 12),
    "drain_timeout": ("30", 30.0),
    "ha_backend": ("redis", "redis"),
    "ha_lock_path": ("/tmp/lock", "/tmp/lock"),
    "ha_redis_url": ("redis://10.0.0.1:6379/2", "redis://10.0.0.1:6379/2"),
    "ha_lock_name": ("lock-x", "lock-x"),
    "ha_lease_duration": ("20", 20.0),
    "ha_renew_deadline": ("12", 12.0),
    "ha_retry_period": ("3", 3.0),
    "namespace": ("desktops", "desktops"),
    "gc_interval": ("30", 30.0),
    "gc_grace": ("90", 90.0),
    "docker_network_pool": ("10.99.0.0/16", "10.99.0.0/16"),
    "docker_network_prefix": ("27", 27),
    "docker_start_timeout": ("45", 45.0),
    "egress_proxy": ("203.0.113.5:3128", "203.0.113.5:3128"),
    "egress_dns": ("192.0.2.53, 198.51.100.53", "192.0.2.53,198.51.100.53"),
    "session_min_cpu": ("0.25", 0.25),
    "session_min_memory_mb": ("128", 128),
    "log_format": ("JSON", "json"),
    "metrics_port": ("9464", 9464),
    "metrics_bind": ("0.0.0.0", "0.0.0.0"),
    "status_file": ("/run/streamspace/agent-status", "/run/streamspace/agent-status"),
}


@pytest.fixture
def clean_env(monkeypatch):
    for env, _ in _SETTINGS.values():
        monkeypatch.delenv(env, raising=False)
        monkeypatch.delenv(env + "_FILE", raising=False)
    for env, value in REQUIRED.items():
        monkeypatch.setenv(env, value)
    return monkeypatch


def test_every_setting_has_a_sample():
    assert set(SAMPLES) == set(_SETTINGS)


@pytest.mark.parametrize("name", sorted(_SETTINGS))
def test_every_agent_setting_can_be_read_from_name_file(clean_env, tmp_path, name):
    env = _SETTINGS[name][0]
    text, expected = SAMPLES[name]
    secret = tmp_path / env.lower()
    secret.write_text(text + "\n")  # secrets files usually end with a newline
    clean_env.delenv(env, raising=False)
    clean_env.setenv(env + "_FILE", str(secret))
    assert getattr(parse_config([]), name) == expected


def test_the_file_wins_over_the_variable_and_a_flag_wins_over_both(clean_env, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("ssa_from_file")
    clean_env.setenv("AGENT_TOKEN_FILE", str(secret))
    assert parse_config([]).token == "ssa_from_file"
    assert parse_config(["--token", "ssa_flag"]).token == "ssa_flag"


def test_an_unreadable_file_names_the_variable(clean_env, tmp_path):
    clean_env.setenv("AGENT_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"AGENT_TOKEN_FILE: cannot read .*missing"):
        parse_config([])


def test_a_junk_value_in_a_file_names_the_setting(clean_env, tmp_path):
    junk = tmp_path / "interval"
    junk.write_text("soon")
    clean_env.setenv("HEARTBEAT_INTERVAL_FILE", str(junk))
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL must be a number"):
        parse_config([])


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_real_agent_connects_with_its_token_from_agent_token_file(control_plane, tmp_path):
    _, token, _ = agent_register(agent_id="token-file-agent", platform="docker", region="test")
    secret = tmp_path / "agent-token"
    secret.write_text(token + "\n")
    secret.chmod(0o600)
    proc = agent_process(
        control_plane, "token-file-agent", "", backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "state"), AGENT_TOKEN_FILE=str(secret),
    ).start()  # fmt: skip
    try:
        wait_for(lambda: Agent.objects.get(agent_id="token-file-agent").status == "online", 15,
                 what=f"the agent online with its token from a file\n{proc.output()}")  # fmt: skip
    finally:
        proc.kill()


@pytest.mark.parametrize(
    "env,value,words",
    [
        ("EGRESS_PROXY", "proxy.example.com:3128", "EGRESS_PROXY must be an IPv4 address and port"),
        ("EGRESS_PROXY", "203.0.113.5", "EGRESS_PROXY must be an IPv4 address and port"),
        ("EGRESS_DNS", "192.0.2.53,resolver", "EGRESS_DNS must be comma-separated IPv4 addresses"),
    ],
)
def test_a_junk_egress_setting_is_refused_by_name(clean_env, env, value, words):
    clean_env.setenv(env, value)
    with pytest.raises(ConfigError, match=words):
        parse_config([])


def test_egress_resolvers_follow_systemd_resolved_as_dockerd_does(tmp_path):
    """Found by review: on a systemd-resolved host /etc/resolv.conf lists only 127.0.0.53
    and dockerd forwards to the upstream servers of /run/systemd/resolve/resolv.conf: those
    must be the ones a desktop may query, or DNS breaks in egress "internet"."""
    from agent_clients.backends.egress import resolvers

    stub, upstream, plain = tmp_path / "stub", tmp_path / "upstream", tmp_path / "plain"
    stub.write_text("nameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver 10.0.0.2\nnameserver 192.0.2.53\n")
    plain.write_text("# comment\nnameserver 127.0.0.1\nnameserver 192.0.2.1\nnameserver not-an-ip\n")
    assert resolvers(str(stub), str(upstream)) == ["10.0.0.2", "192.0.2.53"]
    assert resolvers(str(plain), str(upstream)) == ["192.0.2.1"]
    assert resolvers(str(tmp_path / "missing"), str(upstream)) == []


@pytest.mark.parametrize(
    "env,value,words",
    [
        ("METRICS_PORT", "70000", "METRICS_PORT must be a TCP port"),
        ("METRICS_PORT", "-1", "METRICS_PORT must be positive"),
        ("METRICS_BIND", "localhost", "METRICS_BIND must be an IP address"),
    ],
)
def test_a_junk_metrics_setting_is_refused_by_name(clean_env, env, value, words):
    clean_env.setenv(env, value)
    with pytest.raises(ConfigError, match=words):
        parse_config([])


def test_the_metrics_port_is_off_unless_configured(clean_env):
    cfg = parse_config([])
    assert cfg.metrics_port == 0 and cfg.metrics_bind == "127.0.0.1"
