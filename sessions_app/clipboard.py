"""What may cross a viewer's clipboard: each direction on or off (the template's
``clipboard_to_desktop`` / ``clipboard_to_browser``) and at most how many bytes of UTF-8
text (the operator's CLIPBOARD_MAX_TO_DESKTOP / CLIPBOARD_MAX_TO_BROWSER).

The same rules reach three places: the agent, which starts Xvnc with -AcceptCutText,
-SendCutText and -MaxCutText (agent_clients.backends.base.SessionSpec.desktop_env); the
relay, which drops or bounds what the viewer sends (vnc_app.rfb.ClientStreamWatcher);
and the viewer page, which hides a direction that is off (static/js/viewer-clipboard.js).
"""

from __future__ import annotations

from django.conf import settings

from vnc_app.rfb import ClipboardRules


def rules(template) -> ClipboardRules:
    return ClipboardRules(
        to_desktop=template.clipboard_to_desktop,
        to_browser=template.clipboard_to_browser,
        max_to_desktop=settings.CLIPBOARD_MAX_TO_DESKTOP,
        max_to_browser=settings.CLIPBOARD_MAX_TO_BROWSER,
    )


def as_payload(template) -> dict:
    """The rules as a create_session command (and the viewer page) carry them."""
    r = rules(template)
    return {"to_desktop": r.to_desktop, "to_browser": r.to_browser,
            "max_to_desktop": r.max_to_desktop, "max_to_browser": r.max_to_browser}  # fmt: skip
