"""Writes for the VNC relay: the audit trail (the session's last input goes through sessions_app.services)."""

from __future__ import annotations

from django.utils import timezone

from vnc_app.models import VNCConnection


def vnc_connection_open(*, session_id, user_id: int, client_address: str, stream: str = "vnc") -> int:
    return VNCConnection.objects.create(
        session_id=session_id, user_id=user_id, client_address=client_address[:64], stream=stream
    ).pk


def vnc_connection_tunnel_ready(*, connection_pk: int) -> None:
    VNCConnection.objects.filter(pk=connection_pk, tunnel_ready_at__isnull=True).update(tunnel_ready_at=timezone.now())


def vnc_connection_close(*, connection_pk: int, bytes_to_client: int, bytes_from_client: int, reason: str) -> None:
    VNCConnection.objects.filter(pk=connection_pk, closed_at__isnull=True).update(
        closed_at=timezone.now(),
        bytes_to_client=bytes_to_client,
        bytes_from_client=bytes_from_client,
        close_reason=reason[:255],
    )
