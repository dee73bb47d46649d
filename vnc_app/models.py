from django.conf import settings
from django.db import models


class VNCConnection(models.Model):
    """Audit: one row per viewer connection."""

    session = models.ForeignKey("sessions_app.Session", on_delete=models.CASCADE, related_name="vnc_connections")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    client_address = models.CharField(max_length=64, blank=True, default="")
    # What the connection carried: the desktop (VNC) or its sound (the viewer's second socket).
    stream = models.CharField(max_length=8, choices=[("vnc", "VNC"), ("audio", "Sound")], default="vnc")
    opened_at = models.DateTimeField(auto_now_add=True)
    # When the agent reported the tunnel open (the tunnel open latency is this minus opened_at).
    tunnel_ready_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    bytes_to_client = models.BigIntegerField(default=0)
    bytes_from_client = models.BigIntegerField(default=0)
    close_reason = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        ordering = ["-opened_at"]
        verbose_name = "VNC connection"

    def __str__(self) -> str:
        return f"{self.user} → {self.session_id} at {self.opened_at:%Y-%m-%d %H:%M}"


class FileTransfer(models.Model):
    """Audit: one row per upload or download through the control plane (vnc_app.file_transfer)."""

    UPLOAD, DOWNLOAD = "upload", "download"
    IN_PROGRESS, OK, FAILED = "in_progress", "ok", "failed"

    session = models.ForeignKey("sessions_app.Session", on_delete=models.CASCADE, related_name="file_transfers")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    direction = models.CharField(max_length=8, choices=[(UPLOAD, "upload"), (DOWNLOAD, "download")])
    path = models.CharField(max_length=4096, help_text="relative to the session's home")
    bytes = models.BigIntegerField(default=0, help_text="bytes moved")
    outcome = models.CharField(
        max_length=12, default=IN_PROGRESS, choices=[(IN_PROGRESS, "in progress"), (OK, "ok"), (FAILED, "failed")]
    )
    detail = models.CharField(max_length=255, blank=True, default="")
    client_address = models.CharField(max_length=64, blank=True, default="")
    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.direction} {self.path} ({self.bytes} B) by {self.user} in {self.session_id}"
