"""Agent configuration from CLI flags and the environment (flags win); any variable
``NAME`` may instead be read from the file named by ``NAME_FILE``.

One place for every agent setting; backends and leadership read theirs from here.
A junk value ends the process with one line naming the setting.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
from dataclasses import dataclass, field

from agent_clients.backends.base import DEFAULT_MIN_CPU, DEFAULT_MIN_MEMORY_MB

BACKENDS = {
    "docker": "agent_clients.backends.docker:DockerBackend",
    "kubernetes": "agent_clients.backends.kubernetes:KubernetesBackend",
}
LEADERSHIPS = {
    "none": "agent_clients.leadership.base:AlwaysLeader",
    "file": "agent_clients.leadership.file:FileLeadership",
    "redis": "agent_clients.leadership.redis:RedisLeadership",
    "lease": "agent_clients.leadership.lease:LeaseLeadership",
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    control_plane_url: str  # ws(s):// or http(s):// base of the control plane
    token: str
    backend: str = "docker"  # a key of BACKENDS or "package.module:Class"
    region: str = ""
    heartbeat_interval: float = 10.0
    reconnect_cap: float = 10.0  # seconds: the ceiling of the reconnect backoff
    max_sessions: int = 10
    drain_timeout: float = 60.0
    ha_backend: str = "none"  # a key of LEADERSHIPS
    ha_lock_path: str = "/var/lock/streamspace-agent-leader.lock"
    ha_redis_url: str = "redis://127.0.0.1:6379/0"
    ha_lock_name: str = ""  # defaults to the agent id: replicas of one agent share it
    ha_lease_duration: float = 15.0
    ha_renew_deadline: float = 10.0
    ha_retry_period: float = 2.0
    namespace: str = "streamspace"
    gc_interval: float = 60.0  # seconds between garbage collections (one also after every hello)
    gc_grace: float = 60.0  # objects younger than this are never collected (a create may be in flight)
    docker_network_pool: str = "10.213.0.0/16"  # session networks get their subnets from here
    docker_network_prefix: int = 28  # the size of each session's subnet
    docker_start_timeout: float = 60.0  # seconds a new or woken desktop has to answer on its VNC port
    egress_proxy: str = ""  # ip:port of the HTTP proxy of templates with egress "proxy"
    egress_dns: str = ""  # comma-separated resolvers desktops may query (default: the host's resolv.conf)
    # The least CPU (cores) and memory (MB) a session may have here: checked again by every
    # backend, whatever the control plane sent, so that no limit rounds to "none".
    session_min_cpu: float = DEFAULT_MIN_CPU
    session_min_memory_mb: int = DEFAULT_MIN_MEMORY_MB
    log_format: str = "text"  # or "json": one object per line (agent_clients/runtime/logfmt.py)
    metrics_port: int = 0  # serve Prometheus metrics on this port (0: off)
    metrics_bind: str = "127.0.0.1"  # the address the metrics port listens on
    status_file: str = ""  # write the agent's state here (agent_clients/runtime/status.py); "" = off
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @property
    def lock_name(self) -> str:
        return self.ha_lock_name or f"streamspace-agent-{self.agent_id}"

    @property
    def connect_url(self) -> str:
        base = self.control_plane_url.rstrip("/")
        for http, ws in (("https://", "wss://"), ("http://", "ws://")):
            if base.startswith(http):
                base = ws + base[len(http) :]
        return f"{base}/api/v1/agent/connect?agent_id={self.agent_id}"


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw.rstrip("s"))
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _cores(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of CPU cores, got {raw!r}") from None
    if not (math.isfinite(value) and 0.001 <= value <= 1024):
        raise ConfigError(f"{name} must be between 0.001 and 1024 cores, got {raw!r}")
    return value


def _megabytes(name: str, raw: str) -> int:
    value = _positive_int(name, raw)
    if value < 6:  # Docker refuses a memory limit under 6 MB
        raise ConfigError(f"{name} must be at least 6 (MB), got {raw!r}")
    return value


def _ipv4_network(name: str, raw: str) -> str:
    try:
        return str(ipaddress.IPv4Network(raw.strip()))
    except ValueError as exc:
        raise ConfigError(f"{name} must be an IPv4 network such as 10.213.0.0/16, got {raw!r} ({exc})") from None


def _egress_proxy(name: str, raw: str) -> str:
    from agent_clients.backends.egress import parse_proxy

    try:
        host, port = parse_proxy(raw) or ("", 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return f"{host}:{port}"


def _ipv4_list(name: str, raw: str) -> str:
    try:
        return ",".join(str(ipaddress.IPv4Address(x.strip())) for x in raw.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} must be comma-separated IPv4 addresses, got {raw!r} ({exc})") from None


def _log_format(name: str, raw: str) -> str:
    from agent_clients.runtime.logfmt import parse_format

    try:
        return parse_format(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _port(name: str, raw: str) -> int:
    value = _positive_int(name, raw)
    if value > 65535:
        raise ConfigError(f"{name} must be a TCP port (1-65535), got {raw!r}")
    return value


def _ip_address(name: str, raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ConfigError(f"{name} must be an IP address such as 127.0.0.1 or 0.0.0.0, got {raw!r}") from None


# flag name -> (environment variable, parser or None for strings)
_SETTINGS = {
    "agent_id": ("AGENT_ID", None),
    "control_plane_url": ("CONTROL_PLANE_URL", None),
    "token": ("AGENT_TOKEN", None),
    "backend": ("AGENT_BACKEND", None),
    "region": ("REGION", None),
    "heartbeat_interval": ("HEARTBEAT_INTERVAL", _positive_float),
    "reconnect_cap": ("RECONNECT_CAP", _positive_float),
    "max_sessions": ("MAX_SESSIONS", _positive_int),
    "drain_timeout": ("DRAIN_TIMEOUT", _positive_float),
    "ha_backend": ("HA_BACKEND", None),
    "ha_lock_path": ("HA_LOCK_PATH", None),
    "ha_redis_url": ("HA_REDIS_URL", None),
    "ha_lock_name": ("HA_LOCK_NAME", None),
    "ha_lease_duration": ("HA_LEASE_DURATION", _positive_float),
    "ha_renew_deadline": ("HA_RENEW_DEADLINE", _positive_float),
    "ha_retry_period": ("HA_RETRY_PERIOD", _positive_float),
    "namespace": ("NAMESPACE", None),
    "gc_interval": ("GC_INTERVAL", _positive_float),
    "gc_grace": ("GC_GRACE", _positive_float),
    "docker_network_pool": ("DOCKER_NETWORK_POOL", _ipv4_network),
    "docker_network_prefix": ("DOCKER_NETWORK_PREFIX", _positive_int),
    "docker_start_timeout": ("DOCKER_START_TIMEOUT", _positive_float),
    "egress_proxy": ("EGRESS_PROXY", _egress_proxy),
    "egress_dns": ("EGRESS_DNS", _ipv4_list),
    "session_min_cpu": ("SESSION_MIN_CPU", _cores),
    "session_min_memory_mb": ("SESSION_MIN_MEMORY_MB", _megabytes),
    "log_format": ("LOG_FORMAT", _log_format),
    "metrics_port": ("METRICS_PORT", _port),
    "metrics_bind": ("METRICS_BIND", _ip_address),
    "status_file": ("STATUS_FILE", None),
}


def env_value(env: str) -> str | None:
    """``NAME``, or the content of the file named by ``NAME_FILE`` (Docker and Kubernetes
    secrets), which wins when set, as on the control plane (streamspace/env.py)."""
    path = os.environ.get(f"{env}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"{env}_FILE: cannot read {path}: {exc.strerror}") from None
    return os.environ.get(env)


def parse_config(argv: list[str] | None = None, *, default_backend: str | None = None) -> AgentConfig:
    """Read flags (``--agent-id``, ``--heartbeat-interval`` ...) then the environment."""
    parser = argparse.ArgumentParser(prog="streamspace-agent", description="StreamSpace agent")
    for name, (env, _) in _SETTINGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=f"(env {env})")
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for name, (env, parse) in _SETTINGS.items():
        raw = getattr(args, name)
        if raw is None:
            raw = env_value(env)
        if raw is None or raw == "":
            continue
        values[name] = parse(env, raw) if parse else raw
    if default_backend and "backend" not in values:
        values["backend"] = default_backend
    for required in ("agent_id", "control_plane_url", "token"):
        if not values.get(required):
            raise ConfigError(f"{_SETTINGS[required][0]} is required (or --{required.replace('_', '-')})")
    url = str(values["control_plane_url"])
    if not url.startswith(("ws://", "wss://", "http://", "https://")):
        raise ConfigError(f"CONTROL_PLANE_URL must start with ws://, wss://, http:// or https://, got {url!r}")
    if values.get("ha_backend", "none") not in LEADERSHIPS:
        raise ConfigError(f"HA_BACKEND must be one of {', '.join(LEADERSHIPS)}")
    cfg = AgentConfig(**values)  # type: ignore[arg-type]
    if cfg.ha_renew_deadline >= cfg.ha_lease_duration:
        raise ConfigError("HA_RENEW_DEADLINE must be shorter than HA_LEASE_DURATION")
    pool = ipaddress.IPv4Network(cfg.docker_network_pool)
    if not pool.prefixlen <= cfg.docker_network_prefix <= 30:
        raise ConfigError(
            f"DOCKER_NETWORK_PREFIX must be between {pool.prefixlen} (the pool's own) and 30, "
            f"got {cfg.docker_network_prefix}"
        )
    return cfg


def import_dotted(path: str) -> type:
    """Import ``package.module:Name``."""
    import importlib

    module, _, name = path.partition(":")
    if not name:
        raise ConfigError(f"expected 'package.module:Class', got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {path}: {exc}") from None
