"""The viewer page: noVNC in the browser, talking to ``WS /api/v1/vnc/<session_id>``."""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.middleware.csrf import get_token
from django.shortcuts import render
from django.templatetags.static import static
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from sessions_app import clipboard, lifecycle, selectors
from streamspace.errors import NotFound


@never_cache  # the page carries the session's VNC password: no cache may keep it
@login_required
@require_GET
def viewer(request, session_id):
    try:
        session = selectors.session_get_for_user(user=request.user, session_id=session_id)
    except NotFound:
        raise Http404("no such session") from None
    scheme = "wss" if request.is_secure() else "ws"
    config = {
        "session_id": str(session.pk),
        "template": session.template.name,
        "state": session.state,
        "error_message": session.error_message or "",
        "ws_url": f"{scheme}://{request.get_host()}/api/v1/vnc/{session.pk}",
        # The user never types it: noVNC answers the desktop's VNC challenge with it.
        "password": session.vnc_password,
        "session_url": reverse("session", args=[session.pk]),
        "wake_url": reverse("session-wake", args=[session.pk]),
        "keepalive_url": reverse("session-keepalive", args=[session.pk]),
        "watch_ms": lifecycle.viewer_watch_ms(session),  # often enough to show a lifecycle warning in time
        "lifecycle_reason": session.lifecycle_reason,
        "csrf_token": get_token(request),
        "rfb_module_url": static("novnc/core/rfb.js"),
        "login_url": f"{reverse('portal:login')}?{urlencode({'next': request.get_full_path()})}",
        "portal_url": reverse("portal:home"),
        # The second socket, for sessions created with sound (static/js/viewer-audio.js): their
        # desktop serves it, whatever the template says now. Absent otherwise.
        "audio_url": f"{scheme}://{request.get_host()}/api/v1/audio/{session.pk}" if session.sound else "",
        "clipboard": clipboard.as_payload(session.template),  # the relay and Xvnc enforce it too
    }
    return render(request, "vnc/viewer.html", {"session": session, "viewer_config": config})
