import json

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q

from agents_app import services
from agents_app.models import CPU_OVERCOMMIT_MAX, MEMORY_OVERCOMMIT_MAX, Agent, AgentCommand
from sessions_app.states import LIVE_STATES
from streamspace.admin_saving import SaveChangedFieldsOnly


class AgentForm(forms.ModelForm):
    class Meta:
        model = Agent
        fields = "__all__"
        help_texts = {
            "cpu_overcommit": (
                "Sessions may reserve up to the reported CPU cores times this ratio (1 to "
                f"{CPU_OVERCOMMIT_MAX:g}). Idle desktops use almost no CPU and the kernel shares "
                "busy cores fairly, so 4 suits desktops; 1 means one reserved core per real core."
            ),
            "memory_overcommit": (
                "Sessions may reserve up to the reported memory times this ratio (1 to "
                f"{MEMORY_OVERCOMMIT_MAX:g}). Above 1 risks the kernel killing desktops (OOM) "
                "when many get busy at once; 1.5 is the default."
            ),
            "drain_requested": (
                "Set by the Drain action, cleared by Undrain: no new sessions land here, "
                "whatever the agent's heartbeats say. Its sessions keep running."
            ),
        }


SECRET_KEYS = ("password", "token", "secret")


def _masked(value):
    if isinstance(value, dict):
        return {k: "********" if any(s in k.lower() for s in SECRET_KEYS) else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _names(agents) -> str:
    return ", ".join(a.agent_id for a in agents)


@admin.register(Agent)
class AgentAdmin(SaveChangedFieldsOnly):
    form = AgentForm
    list_display = [
        "agent_id",
        "platform",
        "region",
        "status",
        "drain_requested",
        "connected",
        "live_sessions",
        "cpu_overcommit",
        "memory_overcommit",
        "last_heartbeat",
        "version",
    ]
    list_editable = ["cpu_overcommit", "memory_overcommit"]
    list_filter = ["platform", "status", "drain_requested", "region"]
    search_fields = ["agent_id", "region"]
    readonly_fields = [
        "status",
        "drain_requested",
        "capacity",
        "version",
        "token_hash",
        "channel_name",
        "last_heartbeat",
        "created_at",
        "updated_at",
    ]
    actions = ["drain", "undrain"]

    def get_queryset(self, request):
        return (
            super().get_queryset(request).annotate(_live=Count("sessions", filter=Q(sessions__state__in=LIVE_STATES)))
        )

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # one agent at a time, through the service below
        return actions

    def has_delete_permission(self, request, obj=None):
        """An agent still holding live sessions cannot be deleted (drain it, terminate them first)."""
        if obj is not None and obj.sessions.filter(state__in=LIVE_STATES).exists():
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request, obj):
        services.agent_delete(agent=obj)

    @admin.display(boolean=True)
    def connected(self, obj):
        return obj.is_connected

    @admin.display(ordering="_live", description="live sessions")
    def live_sessions(self, obj):
        return obj._live

    @admin.action(description="Drain: take no new sessions (running ones stay)")
    def drain(self, request, queryset):
        agents = list(queryset)
        live = sum(services.agent_drain(agent=agent) for agent in agents)
        self.message_user(
            request,
            f"Draining {_names(agents)}: no new sessions land on them; their {live} live session(s) keep running. "
            "Undrain to take new sessions again.",
            messages.SUCCESS,
        )

    @admin.action(description="Undrain: take new sessions again")
    def undrain(self, request, queryset):
        agents = [a for a in queryset if a.drain_requested]
        skipped = [a for a in queryset if not a.drain_requested]
        for agent in agents:
            services.agent_undrain(agent=agent)
        if agents:
            self.message_user(request, f"Undrained {_names(agents)}: new sessions may land there again.")
        if skipped:
            self.message_user(
                request, f"Left as they are (not drained by an operator): {_names(skipped)}.", messages.WARNING
            )


@admin.register(AgentCommand)
class AgentCommandAdmin(admin.ModelAdmin):
    list_display = ["command_id", "type", "agent", "session", "status", "attempts", "created_at", "completed_at"]
    list_filter = ["status", "type", "agent"]
    search_fields = ["command_id", "agent__agent_id", "session__id"]
    list_select_related = ["agent", "session"]
    exclude = ["payload"]
    readonly_fields = [f.name for f in AgentCommand._meta.fields if f.name != "payload"] + ["payload_shown"]

    @admin.display(description="payload")
    def payload_shown(self, obj):
        """The payload with secrets masked (a create carries the session's VNC password)."""
        return json.dumps(_masked(obj.payload), indent=2, sort_keys=True)

    # The queue is written by the services only, and it is part of each session's audit trail.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
