"""VNC tunnel relay between viewer sockets and agent sockets (built out with the viewer)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


async def close_agent_tunnels(channel_layer, agent_channel: str, reason: str) -> None:
    """The agent socket closed: every tunnel through it ends."""


async def from_agent_data(channel_layer, agent_channel: str, tunnel_id: int, data: bytes) -> None:
    """Bytes from the agent for one tunnel."""


async def from_agent_control(channel_layer, agent_channel: str, message) -> None:
    """tunnel_ready / tunnel_error / tunnel_close / tunnel_credit from the agent."""
