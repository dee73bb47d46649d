"""Admin pages save only what the operator changed.

Django's ModelAdmin saves the whole row it read: a read-only field still has the value
read at the start of the request and is written back, over whatever a service wrote
meanwhile (a session's state moved by the agent's answer, an agent's current socket
after a reconnect, which fencing then takes for a superseded one)."""

from __future__ import annotations

from django.contrib import admin


class SaveChangedFieldsOnly(admin.ModelAdmin):
    """Save the fields of the submitted form that changed, nothing else (also for
    ``list_editable`` columns, which go through ``save_model`` too)."""

    def save_model(self, request, obj, form, change):
        if not change:
            return super().save_model(request, obj, form, change)
        fields = [name for name in form.changed_data if name in {f.name for f in obj._meta.concrete_fields}]
        if fields:
            has_updated_at = any(f.name == "updated_at" for f in obj._meta.concrete_fields)
            obj.save(update_fields=fields + (["updated_at"] if has_updated_at else []))
