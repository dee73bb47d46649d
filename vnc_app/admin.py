from django.contrib import admin

from vnc_app.models import FileTransfer, VNCConnection


@admin.register(VNCConnection)
class VNCConnectionAdmin(admin.ModelAdmin):
    list_display = [
        "session",
        "user",
        "stream",
        "client_address",
        "opened_at",
        "closed_at",
        "bytes_to_client",
        "bytes_from_client",
        "close_reason",
    ]
    list_filter = ["stream", "opened_at"]
    search_fields = ["session__id", "user__username", "client_address"]
    list_select_related = ["session", "user"]
    readonly_fields = [f.name for f in VNCConnection._meta.fields]

    # An audit trail: written by the relay, never added or removed by hand.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(FileTransfer)
class FileTransferAdmin(admin.ModelAdmin):
    list_display = ["started_at", "user", "session", "direction", "path", "bytes", "outcome", "detail"]
    list_filter = ["direction", "outcome", "started_at"]
    search_fields = ["session__id", "user__username", "path"]
    list_select_related = ["session", "user"]
    readonly_fields = [f.name for f in FileTransfer._meta.fields]

    # An audit trail: written by the transfers, never added or removed by hand.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
