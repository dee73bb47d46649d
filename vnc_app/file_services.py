"""Writes of the file transfer audit (one FileTransfer row per upload or download)."""

from __future__ import annotations

from django.utils import timezone

from vnc_app.models import FileTransfer


def transfer_begin(*, ticket) -> int:
    row = FileTransfer.objects.create(
        session_id=ticket.session_id,
        user_id=ticket.user_id,
        direction=FileTransfer.UPLOAD if ticket.op == "put" else FileTransfer.DOWNLOAD,
        path=ticket.path,
        client_address=ticket.client_address[:64],
    )
    return row.pk


def transfer_finish(*, pk: int, outcome: str, moved: int, detail: str = "") -> None:
    FileTransfer.objects.filter(pk=pk).update(
        outcome=outcome, bytes=moved, detail=detail[:255], finished_at=timezone.now()
    )
