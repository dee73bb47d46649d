from django.contrib import admin, messages
from django.utils.html import format_html, format_html_join

from sessions_app import services
from sessions_app.models import GroupPolicy, Quota, Session, SessionEvent, Template
from sessions_app.states import IllegalTransition, State
from streamspace.admin_saving import SaveChangedFieldsOnly
from streamspace.errors import ServiceError


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = [
        "slug", "name", "image", "default_cpu", "default_memory_mb", "platform", "region", "egress", "enabled",
    ]  # fmt: skip
    list_filter = ["enabled", "platform", "region", "egress"]
    search_fields = ["slug", "name", "image"]
    prepopulated_fields = {"slug": ["name"]}
    fieldsets = [
        (None, {"fields": [
            "slug", "name", "description", "image", "vnc_port", "sound", "default_cpu", "default_memory_mb", "env",
            "volume_mount_path", "enabled", "platform", "region", "egress", "egress_allow",
        ]}),
        ("Clipboard (size limits: CLIPBOARD_MAX_TO_DESKTOP / CLIPBOARD_MAX_TO_BROWSER)",
         {"fields": ["clipboard_to_desktop", "clipboard_to_browser"]}),
        ("Lifecycle policy (empty: the environment's default; a group's policy overrides)",
         {"fields": ["idle_timeout", "idle_action", "no_viewer_timeout", "max_lifetime"]}),
    ]  # fmt: skip


@admin.register(GroupPolicy)
class GroupPolicyAdmin(admin.ModelAdmin):
    list_display = ["group", "idle_timeout", "idle_action", "no_viewer_timeout", "max_lifetime"]


def _label(session: Session) -> str:
    return f"{session.template.name} {str(session.pk)[:8]} ({session.owner.get_username()})"


@admin.register(Session)
class SessionAdmin(SaveChangedFieldsOnly):
    """Sessions are changed through the services only, as in the portal and the API: the
    actions below terminate, hibernate or wake them. There is no add and no delete: a row
    deleted here would leave its container, network and volume running and lose its audit
    trail (commands, VNC connections); Terminate removes what the session holds and keeps
    the row. The VNC password is not shown; only the tags are editable."""

    list_display = ["id", "owner", "template", "state", "agent", "platform", "region", "created_at", "last_activity"]
    list_filter = ["state", "platform", "region", "template"]
    search_fields = ["id", "owner__username", "agent__agent_id", "cluster_id"]
    list_select_related = ["owner", "template", "agent"]
    exclude = ["vnc_password"]
    readonly_fields = [
        *(f.name for f in Session._meta.fields if f.name not in ("tags", "vnc_password")),  # a service owns them
        "timeline",
    ]
    actions = ["terminate", "hibernate", "wake"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="timeline")
    def timeline(self, obj):
        """Every state change, oldest first, with its reason (SessionEvent)."""
        rows = format_html_join(
            "",
            "<li>{} &nbsp; {} &rarr; {} &nbsp; {}</li>",
            (
                (f"{e.at:%Y-%m-%d %H:%M:%S}", e.from_state or "-", e.to_state, e.reason)
                for e in SessionEvent.objects.filter(session=obj)
            ),
        )
        return format_html("<ul>{}</ul>", rows) if rows else "-"

    def has_delete_permission(self, request, obj=None):
        return False

    def _apply(self, request, queryset, service, doing: str, skip_states=()):
        done, unchanged, refused = [], [], []
        for session in queryset.select_related("template", "owner"):
            if session.state in skip_states:
                unchanged.append(f"{_label(session)} is already {session.state}")
                continue
            try:
                service(session=session)
            except (ServiceError, IllegalTransition) as exc:
                refused.append(f"{_label(session)}: {exc}")
            else:
                done.append(_label(session))
        if done:
            self.message_user(request, f"{doing} {len(done)} session(s): {', '.join(done)}.", messages.SUCCESS)
        if unchanged:
            self.message_user(request, f"Left as they are: {'; '.join(unchanged)}.", messages.INFO)
        if refused:
            self.message_user(request, f"Refused for {len(refused)}: {'; '.join(refused)}.", messages.ERROR)

    @admin.action(description="Terminate: stop and remove what the session holds (the record is kept)")
    def terminate(self, request, queryset):
        self._apply(
            request,
            queryset,
            services.session_terminate,
            "Terminating",
            skip_states=(State.TERMINATED, State.TERMINATING),
        )

    @admin.action(description="Hibernate: stop the desktop, keep its disk")
    def hibernate(self, request, queryset):
        self._apply(request, queryset, services.session_hibernate, "Hibernating")

    @admin.action(description="Wake a hibernated session")
    def wake(self, request, queryset):
        self._apply(request, queryset, services.session_wake, "Waking")


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ["__str__", "user", "group", "max_sessions", "max_cpu", "max_memory_mb"]
    search_fields = ["user__username", "group__name"]
    list_select_related = ["user", "group"]
