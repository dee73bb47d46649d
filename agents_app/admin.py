from django.contrib import admin
from django.db.models import Count, Q

from agents_app.models import Agent, AgentCommand
from sessions_app.states import LIVE_STATES


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = [
        "agent_id",
        "platform",
        "region",
        "status",
        "connected",
        "live_sessions",
        "last_heartbeat",
        "version",
    ]
    list_filter = ["platform", "status", "region"]
    search_fields = ["agent_id", "region"]
    readonly_fields = ["token_hash", "channel_name", "last_heartbeat", "created_at", "updated_at"]
    actions = ["drain"]

    def get_queryset(self, request):
        return (
            super().get_queryset(request).annotate(_live=Count("sessions", filter=Q(sessions__state__in=LIVE_STATES)))
        )

    @admin.display(boolean=True)
    def connected(self, obj):
        return obj.is_connected

    @admin.display(ordering="_live", description="live sessions")
    def live_sessions(self, obj):
        return obj._live

    @admin.action(description="Drain: take no new sessions")
    def drain(self, request, queryset):
        from agents_app.services import agent_set_draining

        for agent in queryset:
            agent_set_draining(agent=agent)


@admin.register(AgentCommand)
class AgentCommandAdmin(admin.ModelAdmin):
    list_display = ["command_id", "type", "agent", "session", "status", "attempts", "created_at", "completed_at"]
    list_filter = ["status", "type", "agent"]
    search_fields = ["command_id", "agent__agent_id", "session__id"]
    list_select_related = ["agent", "session"]
    readonly_fields = [f.name for f in AgentCommand._meta.fields]
