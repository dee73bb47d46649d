"""The portal: the template catalog, "My sessions", and one POST form per action.

Thin views: parse, call the access helper, call a service, respond. Domain errors become
a message on the next page; nothing else changes. A message about one session names it
and the state it describes (``session_message_tag``), so the page drops the message once
the session has moved on.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from sessions_app import selectors, services
from sessions_app.states import TRANSITIONAL_STATES, IllegalTransition, State
from sessions_app.templatetags.portal import session_message_tag
from streamspace.errors import NotFound, ServiceError

# What each action form asks for, and the service that does it.
ACTIONS = {
    "hibernate": (services.session_hibernate, "Hibernating {name}."),
    "wake": (services.session_wake, "Waking {name}."),
    "terminate": (services.session_terminate, "Terminating {name}."),
}


def _my_sessions(user):
    """The portal shows the user's own sessions, terminated ones left out; staff see everyone's in the admin."""
    return selectors.sessions_visible_to(user).filter(owner=user).exclude(state=State.TERMINATED)


def _home_url() -> str:
    return reverse("portal:home") + "#sessions"


@login_required
@require_GET
def home(request):
    return render(
        request,
        "portal/home.html",
        {
            "templates": selectors.templates_enabled(),
            "sessions": _my_sessions(request.user),
            "portal_config": {
                "username": request.user.get_username(),
                "api_sessions_url": reverse("sessions"),
                "rows_url": reverse("portal:session-rows"),
                "transitional_states": sorted(TRANSITIONAL_STATES),
            },
        },
    )


@login_required
@require_GET
def session_rows(request):
    """The rows of "My sessions" alone, for the page's script to swap in when something changed."""
    return render(request, "portal/_session_rows.html", {"sessions": _my_sessions(request.user)})


@login_required
@require_POST
def session_launch(request):
    slug = request.POST.get("template", "")
    try:
        session = services.session_create(user=request.user, template_slug=slug)
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request,
            f"Launching {session.template.name}. It appears under My sessions.",
            extra_tags=session_message_tag(session),
        )
    return redirect(_home_url())


@login_required
@require_POST
def session_action(request, session_id, action):
    if action not in ACTIONS:
        raise Http404("no such action")
    try:
        session = selectors.session_get_for_user(user=request.user, session_id=session_id)
    except NotFound:
        raise Http404("no such session") from None
    service, done = ACTIONS[action]
    try:
        moved = service(session=session)
    except (ServiceError, IllegalTransition) as exc:
        messages.error(request, f"{session.template.name}: {exc}", extra_tags=session_message_tag(session))
    else:
        messages.success(request, done.format(name=session.template.name), extra_tags=session_message_tag(moved))
    return redirect(_home_url())
