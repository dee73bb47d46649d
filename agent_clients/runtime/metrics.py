"""The agent's own Prometheus metrics, served on an optional port (``METRICS_PORT``,
bound to ``METRICS_BIND``, 127.0.0.1 by default); off when no port is configured.

Each ``Agent`` has its own registry, so several runtimes in one process (tests) do not
share counters. These count what this agent process did since it started (Prometheus
handles the reset when it restarts); the fleet's durable numbers are the control
plane's /metrics."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

BACKEND_CALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.commands = Counter(
            "streamspace_agent_commands",
            "Commands this agent ran, by type and outcome.",
            ["type", "outcome"],
            registry=r,
        )
        self.backend_calls = Histogram(
            "streamspace_agent_backend_call_seconds",
            "Calls into the platform backend (Docker, Kubernetes), by call.",
            ["call"],
            buckets=BACKEND_CALL_BUCKETS,
            registry=r,
        )
        self.tunnels_open = Gauge("streamspace_agent_tunnels_open", "VNC tunnels open now.", registry=r)
        self.tunnels_opened = Counter("streamspace_agent_tunnels_opened", "VNC tunnels opened.", registry=r)
        self.tunnel_bytes = Counter(
            "streamspace_agent_tunnel_bytes",
            "Bytes through closed VNC tunnels, by direction (to_desktop, from_desktop).",
            ["direction"],
            registry=r,
        )
        self.connected = Gauge(
            "streamspace_agent_connected", "1 while the control connection is up, 0 otherwise.", registry=r
        )
        self.server: Any = None

    def serve(self, port: int, bind: str) -> None:
        """Start the HTTP exposition server (a daemon thread) on ``bind:port``."""
        self.server, _ = start_http_server(port, addr=bind, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", bind, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
