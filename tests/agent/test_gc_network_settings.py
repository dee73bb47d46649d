"""The garbage collector's and the Docker session networks' settings: read from flags or
the environment, junk refused with one line naming the setting."""

import pytest

from agent_clients.config import ConfigError, parse_config

BASE = ["--agent-id", "a1", "--control-plane-url", "ws://127.0.0.1:1", "--token", "t"]


def test_defaults():
    cfg = parse_config(BASE)
    assert (cfg.gc_interval, cfg.gc_grace) == (60.0, 60.0)
    assert (cfg.docker_network_pool, cfg.docker_network_prefix, cfg.docker_start_timeout) == ("10.213.0.0/16", 28, 60.0)


def test_from_the_environment(monkeypatch):
    monkeypatch.setenv("GC_INTERVAL", "5")
    monkeypatch.setenv("GC_GRACE", "2s")
    monkeypatch.setenv("DOCKER_NETWORK_POOL", "10.50.0.0/20")
    monkeypatch.setenv("DOCKER_NETWORK_PREFIX", "29")
    cfg = parse_config(BASE)
    assert (cfg.gc_interval, cfg.gc_grace, cfg.docker_network_pool, cfg.docker_network_prefix) == (
        5.0,
        2.0,
        "10.50.0.0/20",
        29,
    )


@pytest.mark.parametrize(
    "env, value, message",
    [
        ("GC_INTERVAL", "0", "GC_INTERVAL must be positive"),
        ("GC_GRACE", "soon", "GC_GRACE must be a number"),
        ("DOCKER_NETWORK_POOL", "10.213.0.0/33", "DOCKER_NETWORK_POOL must be an IPv4 network"),
        ("DOCKER_NETWORK_POOL", "10.213.0.1/16", "DOCKER_NETWORK_POOL must be an IPv4 network"),
        ("DOCKER_NETWORK_PREFIX", "12", "DOCKER_NETWORK_PREFIX must be between 16"),
        ("DOCKER_NETWORK_PREFIX", "31", "DOCKER_NETWORK_PREFIX must be between 16"),
    ],
)
def test_junk_is_refused_naming_the_setting(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE)
