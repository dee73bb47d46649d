import uuid

from django.core.exceptions import ValidationError
from django.db import models

from streamspace.text import validate_storable_json

# The highest overcommit ratios an operator may set (see README "Capacity and overcommit").
CPU_OVERCOMMIT_MAX = 32.0
MEMORY_OVERCOMMIT_MAX = 4.0


class Agent(models.Model):
    class Platform(models.TextChoices):
        KUBERNETES = "kubernetes"
        DOCKER = "docker"
        VM = "vm"
        CLOUD = "cloud"

    class Status(models.TextChoices):
        ONLINE = "online"
        OFFLINE = "offline"
        DRAINING = "draining"
        ERROR = "error"

    agent_id = models.CharField(max_length=255, unique=True)
    platform = models.CharField(max_length=20, choices=Platform.choices)
    region = models.CharField(max_length=100, blank=True, default="")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.OFFLINE, db_index=True)
    capacity = models.JSONField(default=dict, blank=True)  # {"cpu": 4, "memory_mb": 8192, "max_sessions": 10}
    metadata = models.JSONField(default=dict, blank=True, validators=[validate_storable_json])
    version = models.CharField(max_length=50, blank=True, default="")
    channel_name = models.CharField(max_length=255, blank=True, default="")
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    token_hash = models.CharField(max_length=64, blank=True, default="")
    # The operator's decision to drain: new sessions do not land here, whatever the
    # agent's own heartbeats say, until an operator undrains it.
    drain_requested = models.BooleanField(default=False)
    # Capacity offered = what the agent reports x these ratios (idle desktops use little CPU).
    cpu_overcommit = models.FloatField(default=4.0)
    memory_overcommit = models.FloatField(default=1.5)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["agent_id"]

    def __str__(self) -> str:
        return self.agent_id

    @property
    def is_connected(self) -> bool:
        return bool(self.channel_name)

    def clean(self) -> None:
        """Overcommit ratios: at least 1 (no undercommit), at most what a desktop host can bear."""
        errors = {}
        for name, most in (("cpu_overcommit", CPU_OVERCOMMIT_MAX), ("memory_overcommit", MEMORY_OVERCOMMIT_MAX)):
            value = getattr(self, name)
            if value is None or not 1.0 <= value <= most:
                errors[name] = f"must be between 1 and {most:g}"
        if errors:
            raise ValidationError(errors)


def _command_id() -> str:
    return uuid.uuid4().hex


class AgentCommand(models.Model):
    """The durable command queue: a command is written here first, then delivered."""

    class Type(models.TextChoices):
        CREATE_SESSION = "create_session"
        TERMINATE_SESSION = "terminate_session"
        HIBERNATE_SESSION = "hibernate_session"
        WAKE_SESSION = "wake_session"
        LIST_SESSIONS = "list_sessions"
        GET_SESSION = "get_session"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        ACKED = "acked"
        COMPLETED = "completed"
        FAILED = "failed"
        TIMED_OUT = "timed_out"

    UNFINISHED = (Status.PENDING, Status.SENT, Status.ACKED)

    command_id = models.CharField(max_length=64, unique=True, default=_command_id)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="commands")
    session = models.ForeignKey(
        "sessions_app.Session", on_delete=models.CASCADE, null=True, blank=True, related_name="commands"
    )
    type = models.CharField(max_length=30, choices=Type.choices)
    payload = models.JSONField(default=dict, blank=True, validators=[validate_storable_json])
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # Bumped when a retryable failure sends the command back for a fresh execution;
    # the agent keys its answer cache by (command_id, execution).
    execution = models.PositiveIntegerField(default=1)
    # Not delivered before this time (the backoff after a retryable failure).
    not_before = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error_message = models.TextField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField()

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["agent", "status", "created_at"]), models.Index(fields=["status", "sent_at"])]

    def __str__(self) -> str:
        return f"{self.type} {self.command_id}"

    def as_message(self) -> dict:
        """The ``command`` payload sent to the agent."""
        return {
            "command_id": self.command_id,
            "type": self.type,
            "session_id": str(self.session_id) if self.session_id else None,
            "payload": self.payload,
            "execution": self.execution,
        }


class SweepRun(models.Model):
    """When each periodic sweep last finished: the sweeps' own heartbeat, read by /readyz,
    so a dead Celery beat (or worker) is visible instead of silent. ``runs`` and
    ``changes`` (what the sweep changed, totals by kind) are the counters /metrics exports."""

    name = models.CharField(max_length=100, primary_key=True)
    finished_at = models.DateTimeField()
    runs = models.PositiveBigIntegerField(default=0)
    changes = models.JSONField(default=dict, blank=True)

    def __str__(self):
        return f"{self.name} at {self.finished_at:%Y-%m-%d %H:%M:%S}"
