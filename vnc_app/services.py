"""Writes for the VNC relay: the audit trail and the user's last input."""

from __future__ import annotations

from django.utils import timezone

from sessions_app.models import Session
from vnc_app.models import VNCConnection


def vnc_connection_open(*, session_id, user_id: int, client_address: str) -> int:
    return VNCConnection.objects.create(session_id=session_id, user_id=user_id, client_address=client_address[:64]).pk


def vnc_connection_close(*, connection_pk: int, bytes_to_client: int, bytes_from_client: int, reason: str) -> None:
    VNCConnection.objects.filter(pk=connection_pk, closed_at__isnull=True).update(
        closed_at=timezone.now(),
        bytes_to_client=bytes_to_client,
        bytes_from_client=bytes_from_client,
        close_reason=reason[:255],
    )


def session_mark_input(*, session_id) -> None:
    Session.objects.filter(pk=session_id).update(last_activity=timezone.now())
