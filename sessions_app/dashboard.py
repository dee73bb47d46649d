"""The staff dashboard: the fleet at a glance, agents and sessions across users, and the
operator's actions (drain, undrain, remove an agent; terminate, hibernate a session).

Staff only: anyone else logged in gets 403, anyone not logged in the login page. Thin
views: reads come from ``dashboard_selectors``, every action goes through the services
(the same ones as the API and the admin), as a POST form behind a confirmation page that
says what happens to the sessions."""

from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from agents_app import services as agent_services
from sessions_app import dashboard_selectors as dash
from sessions_app import selectors, services
from sessions_app.models import Session
from sessions_app.states import LIVE_STATES, IllegalTransition
from sessions_app.templatetags.portal import session_can
from streamspace.errors import NotFound, ServiceError


def staff_required(view):
    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_staff:
            raise PermissionDenied("the dashboard is for staff")
        return view(request, *args, **kwargs)

    return wrapper


def _agent_filters(request) -> dict:
    return {key: request.GET.get(key, "") for key in ("platform", "status", "region")}


def _live_context(request) -> dict:
    filters = _agent_filters(request)
    return {
        "summary": dash.dashboard_summary(),
        "agents": dash.page_of(dash.agent_rows(**filters), request.GET.get("page")),
        "filters": filters,
        "query": request.GET.urlencode(),
    }


@staff_required
@require_GET
def dashboard_home(request):
    return render(
        request,
        "dashboard/home.html",
        {**_live_context(request), "choices": dash.agent_filter_choices()},
    )


@staff_required
@require_GET
def dashboard_live(request):
    """The cards and the agents table alone, for dashboard.js to swap in every 10 s."""
    return render(request, "dashboard/_live.html", _live_context(request))


@staff_required
@require_GET
def agent_page(request, agent_id):
    detail = dash.agent_detail(agent_id=agent_id)
    if detail is None:
        raise Http404("no such agent")
    return render(request, "dashboard/agent.html", detail)


def _agent_consequence(action: str, agent, live: int) -> str:
    name = agent.agent_id
    if action == "drain":
        return (
            f"No new session will land on {name}. Its {live} live session(s) keep running until their users "
            "end them or you terminate them. Undrain it to take new sessions again."
        )
    if action == "undrain":
        return f"{name} takes new sessions again."
    if live:
        return (
            f"{name} holds {live} live session(s): removing it is refused until they have ended. "
            "Drain it, then terminate them (or wait for their users to)."
        )
    return (
        f"The record of {name} and its command history are deleted. Its ended sessions stay in the history "
        "without an agent. The agent's token stops working: a process still running with it cannot reconnect "
        "(it must register again)."
    )


AGENT_ACTIONS = {"drain": "Drain", "undrain": "Undrain", "remove": "Remove"}


@staff_required
@require_http_methods(["GET", "POST"])
def agent_action(request, agent_id, action):
    if action not in AGENT_ACTIONS:
        raise Http404("no such action")
    detail = dash.agent_detail(agent_id=agent_id)
    if detail is None:
        raise Http404("no such agent")
    agent = detail["agent"]
    if request.method == "GET":
        return render(
            request,
            "dashboard/confirm.html",
            {
                "title": f"{AGENT_ACTIONS[action]} agent {agent.agent_id}?",
                "consequence": _agent_consequence(action, agent, agent.live_sessions),
                "button": AGENT_ACTIONS[action],
                "danger": action == "remove",
                "back_url": reverse("portal:dashboard-agent", args=[agent.agent_id]),
            },
        )
    back = redirect("portal:dashboard-agent", agent.agent_id)
    try:
        if action == "drain":
            live = agent_services.agent_drain(agent=agent)
            messages.success(request, f"{agent.agent_id} is draining; its {live} live session(s) keep running.")
        elif action == "undrain":
            agent_services.agent_undrain(agent=agent)
            messages.success(request, f"{agent.agent_id} takes new sessions again.")
        else:
            agent_services.agent_delete(agent=agent)
            messages.success(request, f"Agent {agent.agent_id} removed.")
            return redirect("portal:dashboard")
    except ServiceError as exc:
        messages.error(request, exc.message)
    return back


SESSION_FILTER_KEYS = ("state", "user", "agent", "template", "idle")


def _idle_minutes(raw: str):
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


@staff_required
@require_GET
def session_list(request):
    filters = {key: request.GET.get(key, "") for key in SESSION_FILTER_KEYS}
    if filters["state"] not in dash.SESSION_STATE_FILTERS:
        filters["state"] = "live"
    rows = dash.session_rows(
        state=filters["state"],
        user=filters["user"],
        agent=filters["agent"],
        template=filters["template"],
        idle_minutes=_idle_minutes(filters["idle"]),
    )
    return render(
        request,
        "dashboard/sessions.html",
        {
            "sessions": dash.page_of(rows, request.GET.get("page")),
            "filters": filters,
            "states": dash.SESSION_STATE_FILTERS,
            "query": request.GET.urlencode(),
        },
    )


def _session_or_404(user, session_id) -> Session:
    try:
        return selectors.session_get_for_user(user=user, session_id=session_id)
    except NotFound:
        raise Http404("no such session") from None


@staff_required
@require_GET
def session_page(request, session_id):
    session = _session_or_404(request.user, session_id)
    return render(
        request,
        "dashboard/session.html",
        {"session": session, "timeline": dash.session_timeline(session=session), "live": session.state in LIVE_STATES},
    )


SESSION_ACTIONS = {
    "terminate": (services.session_terminate, "Terminate", "Terminating"),
    "hibernate": (services.session_hibernate, "Hibernate", "Hibernating"),
}


def _session_consequence(action: str, session: Session) -> str:
    whose = f"{session.template.name} of {session.owner.get_username()}"
    where = f" on {session.agent.agent_id}" if session.agent else ""
    if action == "terminate":
        home = "its home volume is kept" if session.keep_home else "its home volume is deleted with it"
        return (
            f"The desktop {whose}{where} stops and is removed; {home}. "
            "A viewer open on it is disconnected. This cannot be undone."
        )
    return (
        f"The desktop {whose}{where} stops; its home is kept, and its user can wake it again from the portal. "
        "A viewer open on it is disconnected."
    )


@staff_required
@require_http_methods(["GET", "POST"])
def session_action(request, session_id, action):
    if action not in SESSION_ACTIONS:
        raise Http404("no such action")
    session = _session_or_404(request.user, session_id)
    service, label, doing = SESSION_ACTIONS[action]
    back_url = reverse("portal:dashboard-session", args=[session.pk])
    if request.method == "GET":
        if not session_can(session, action):
            messages.error(request, f"A {session.state} session cannot be {action}d.")
            return redirect(back_url)
        return render(
            request,
            "dashboard/confirm.html",
            {
                "title": f"{label} {session.template.name} of {session.owner.get_username()}?",
                "consequence": _session_consequence(action, session),
                "button": label,
                "danger": action == "terminate",
                "back_url": back_url,
            },
        )
    try:
        service(session=session)
    except (ServiceError, IllegalTransition) as exc:
        messages.error(request, f"{session.template.name}: {exc}")
    else:
        messages.success(request, f"{doing} {session.template.name} of {session.owner.get_username()}.")
    return redirect(back_url)
