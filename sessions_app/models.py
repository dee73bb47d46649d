import uuid

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from agent_clients import protocol
from agent_clients.backends import egress
from sessions_app import clipboard
from sessions_app.limits import validate_cpu, validate_memory
from sessions_app.states import State
from streamspace.errors import InvalidInput
from streamspace.text import validate_storable_json


def validate_egress_allow(value) -> None:
    """A list of "CIDR", "CIDR:port" or "port" strings (agent_clients.backends.egress.parse_allow)."""
    try:
        egress.parse_allow(value)
    except ValueError as exc:
        raise ValidationError(f"Invalid egress allow list: {exc}", code="invalid_egress_allow") from None


# The agent platforms whose backends carry sound (agent_clients/backends: audio_endpoint).
SOUND_PLATFORMS = frozenset({"docker"})

IDLE_ACTIONS = [("hibernate", "Hibernate"), ("terminate", "Terminate")]


class Template(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True, default="")
    image = models.CharField(max_length=255)
    vnc_port = models.PositiveIntegerField(default=5901)
    sound = models.BooleanField(
        default=False, help_text="The desktop's sound is streamed to the viewer (its image must serve SOUND_PORT)"
    )
    default_cpu = models.FloatField(default=1.0)
    default_memory_mb = models.PositiveIntegerField(default=1024)
    env = models.JSONField(default=dict, blank=True, validators=[validate_storable_json])
    volume_mount_path = models.CharField(max_length=255, default="/home/user")
    enabled = models.BooleanField(default=True)
    platform = models.CharField(max_length=20, blank=True, default="", help_text="Only agents of this platform")
    region = models.CharField(max_length=100, blank=True, default="", help_text="Only agents in this region")
    egress = models.CharField(
        max_length=10,
        choices=[
            ("internet", "Internet (no Docker host, no private or link-local ranges)"),
            ("none", "None"),
            ("proxy", "The agent's HTTP proxy only"),
        ],
        default=egress.DEFAULT_MODE,
        help_text="What the desktop may reach on the network",
    )
    egress_allow = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_egress_allow],
        help_text='Also allowed, in any mode: a list of "CIDR", "CIDR:port" or "port" (e.g. ["10.1.2.0/24:443"])',
    )
    # Clipboard between the viewer and the desktop (sessions_app.clipboard), per direction.
    clipboard_to_desktop = models.BooleanField(default=True, help_text="Viewers may paste into the desktop")
    clipboard_to_browser = models.BooleanField(default=True, help_text="Viewers may copy out of the desktop")
    # Lifecycle policy (sessions_app.lifecycle): seconds, 0 = off, empty = the environment's default.
    idle_timeout = models.PositiveIntegerField(
        null=True, blank=True, help_text="Seconds without key or pointer input before the idle action (0 = off)"
    )
    idle_action = models.CharField(max_length=10, choices=IDLE_ACTIONS, blank=True, default="",
                                   help_text="What happens to an idle session (empty = the default)")  # fmt: skip
    max_lifetime = models.PositiveIntegerField(
        null=True, blank=True, help_text="Seconds after the start before the session is terminated (0 = off)"
    )
    no_viewer_timeout = models.PositiveIntegerField(
        null=True, blank=True, help_text="Seconds with no viewer open before the idle action (0 = off)"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        for name, check in (("default_cpu", validate_cpu), ("default_memory_mb", validate_memory)):
            try:
                check(getattr(self, name), field=name)
            except InvalidInput as exc:
                errors[name] = exc.message
        if self.sound and self.platform and self.platform not in SOUND_PLATFORMS:
            errors["sound"] = f"{self.platform} agents carry no sound (only {', '.join(sorted(SOUND_PLATFORMS))})"
        if self.sound and self.vnc_port == protocol.SOUND_PORT:
            errors["vnc_port"] = f"{protocol.SOUND_PORT} is the desktop's sound port: choose another VNC port"
        if errors:
            raise ValidationError(errors)

    def as_payload(self) -> dict:
        return {
            "slug": self.slug,
            "image": self.image,
            "vnc_port": self.vnc_port,
            "sound": self.sound,
            "env": self.env,
            "volume_mount_path": self.volume_mount_path,
            "egress": self.egress,
            "egress_allow": [str(rule) for rule in egress.parse_allow(self.egress_allow)],
            "clipboard": clipboard.as_payload(self),
        }


class Session(models.Model):
    STATE_CHOICES = [(s, s.capitalize()) for s in State.ALL]

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="desktop_sessions")
    template = models.ForeignKey(Template, on_delete=models.PROTECT, related_name="sessions")
    agent = models.ForeignKey(
        "agents_app.Agent", on_delete=models.SET_NULL, null=True, blank=True, related_name="sessions"
    )
    platform = models.CharField(max_length=20, blank=True, default="")
    region = models.CharField(max_length=100, blank=True, default="")
    cluster_id = models.CharField(max_length=255, blank=True, default="")
    tags = models.JSONField(default=list, blank=True, validators=[validate_storable_json])
    state = models.CharField(max_length=20, choices=STATE_CHOICES, default=State.PENDING, db_index=True)
    cpu = models.FloatField()
    memory_mb = models.PositiveIntegerField()
    keep_home = models.BooleanField(default=False)
    vnc_password = models.CharField(max_length=64, blank=True, default="")
    vnc_host = models.CharField(max_length=255, blank=True, default="")
    vnc_port = models.PositiveIntegerField(null=True, blank=True)
    # The template had sound when the session was created, so its desktop serves it (the
    # viewer offers sound by this, not by the template's current value).
    sound = models.BooleanField(default=False)
    error_message = models.TextField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    state_changed_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_activity = models.DateTimeField(null=True, blank=True)
    terminated_at = models.DateTimeField(null=True, blank=True)
    # Lifecycle (sessions_app.lifecycle): when the open viewer was warned of the idle action
    # (cleared by input), and why the platform last hibernated or ended the session.
    idle_warned_at = models.DateTimeField(null=True, blank=True)
    lifecycle_reason = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "state"]), models.Index(fields=["agent", "state"])]

    def __str__(self) -> str:
        return f"{self.template_id}:{self.id}"


class SessionEvent(models.Model):
    """The session's timeline: one row per state change (and per lifecycle action), with
    why. Written by ``sessions_app.services._move`` in the transition's transaction."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    from_state = models.CharField(max_length=20, blank=True, default="")
    to_state = models.CharField(max_length=20)
    reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["session", "at"])]

    def __str__(self) -> str:
        return f"{self.session_id}: {self.from_state or '-'} -> {self.to_state}"


class Quota(models.Model):
    """Limits for one user or one group (exactly one of the two)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="quota"
    )
    group = models.OneToOneField(Group, on_delete=models.CASCADE, null=True, blank=True, related_name="quota")
    max_sessions = models.PositiveIntegerField(default=5)
    max_cpu = models.FloatField(default=8.0)
    max_memory_mb = models.PositiveIntegerField(default=16384)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(user__isnull=False) & Q(group__isnull=True))
                | (Q(user__isnull=True) & Q(group__isnull=False)),
                name="quota_user_xor_group",
            )
        ]

    def __str__(self) -> str:
        return f"quota for {self.user or self.group}"


class GroupPolicy(models.Model):
    """A group's lifecycle policy: each field set here overrides the template's (and the
    environment's) for sessions of the group's members; empty fields do not."""

    group = models.OneToOneField(Group, on_delete=models.CASCADE, related_name="lifecycle_policy")
    idle_timeout = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds (0 = off)")
    idle_action = models.CharField(max_length=10, choices=IDLE_ACTIONS, blank=True, default="")
    max_lifetime = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds (0 = off)")
    no_viewer_timeout = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds (0 = off)")

    class Meta:
        verbose_name = "group lifecycle policy"
        verbose_name_plural = "group lifecycle policies"

    def __str__(self) -> str:
        return f"lifecycle policy for {self.group}"
