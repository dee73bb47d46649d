"""Template helpers for the staff dashboard."""

from django import template

from sessions_app import dashboard_selectors

register = template.Library()


@register.filter
def command_timings(command) -> dict:
    return dashboard_selectors.command_timings(command)


@register.filter
def milliseconds(value) -> str:
    """A duration in ms as a person reads it: "—" when it has not happened, "840 ms", "12.3 s"."""
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"
