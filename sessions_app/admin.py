from django.contrib import admin

from sessions_app.models import Quota, Session, Template


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "image", "default_cpu", "default_memory_mb", "platform", "region", "enabled"]
    list_filter = ["enabled", "platform", "region"]
    search_fields = ["slug", "name", "image"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "template", "state", "agent", "platform", "region", "created_at", "last_activity"]
    list_filter = ["state", "platform", "region", "template"]
    search_fields = ["id", "owner__username", "agent__agent_id", "cluster_id"]
    list_select_related = ["owner", "template", "agent"]
    readonly_fields = [
        "id",
        "vnc_password",
        "state",
        "created_at",
        "updated_at",
        "state_changed_at",
        "started_at",
        "terminated_at",
    ]
    exclude: list = []


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ["__str__", "user", "group", "max_sessions", "max_cpu", "max_memory_mb"]
    search_fields = ["user__username", "group__name"]
    list_select_related = ["user", "group"]
