"""Login throttling glue for django-axes (settings: "Login throttling" in settings.py).

Axes counts failures and refuses logins while a user name or an address is locked. This
module says how the client's address is found, how long a lock has left (Retry-After),
and how a refusal looks: a page with 429 on the portal and the admin, JSON 429
``{"error": "locked_out"}`` on ``POST /api/v1/auth/token``."""

from __future__ import annotations

import ipaddress
import math

from axes.helpers import get_client_username, get_cool_off
from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Max, Q
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed, Throttled
from rest_framework_simplejwt.views import TokenObtainPairView

LOCKED_OUT = "Too many failed log-ins for this user name or from this address."


def _address(value) -> str | None:
    """An IP address, or None for anything else (a peer on a Unix socket, an in-process test
    client's "testclient"): the database refuses to store those as an address (a 500)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def client_ip(request) -> str | None:
    """The TCP peer's address; behind LOGIN_TRUSTED_PROXY_COUNT proxies, the address the
    outermost one saw (the N-th X-Forwarded-For entry from the right: entries further left
    are whatever the client wrote)."""
    remote = _address(request.META.get("REMOTE_ADDR"))
    count = settings.LOGIN_TRUSTED_PROXY_COUNT
    if not count:
        return remote
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    if len(hops) < count:
        return remote
    try:
        return str(ipaddress.ip_address(hops[-count]))
    except ValueError:
        return remote


def retry_after_seconds(request) -> int:
    """Seconds until the lock on this user name or address lifts: the cool-off counted
    from the latest failure of either (never less than 1)."""
    cool_off = get_cool_off(request)
    username = get_client_username(request, getattr(request, "axes_credentials", None))
    address = getattr(request, "axes_ip_address", None) or client_ip(request)
    which = Q(ip_address=address)
    if username:
        which |= Q(username=username)
    latest = AccessAttempt.objects.filter(which).aggregate(latest=Max("attempt_time"))["latest"]
    if latest is None:
        return max(1, math.ceil(cool_off.total_seconds()))
    return max(1, math.ceil((latest + cool_off - timezone.now()).total_seconds()))


def lockout_response(request, *args):
    """AXES_LOCKOUT_CALLABLE, for the portal and the admin login forms. Axes passes
    (request, response, credentials) or, from its async middleware, (request, credentials):
    neither is needed, the request carries what axes found."""
    seconds = retry_after_seconds(request)
    if request.path.startswith("/api/"):
        response = JsonResponse({"error": "locked_out", "detail": f"{LOCKED_OUT} Try again in {seconds} s."})
        response.status_code = 429
    else:
        minutes = math.ceil(seconds / 60)
        context = {"message": LOCKED_OUT, "seconds": seconds, "minutes": minutes}
        response = render(request, "registration/locked_out.html", context, status=429)
    response["Retry-After"] = str(seconds)
    return response


class LoginLockedOut(Throttled):
    default_code = "locked_out"
    default_detail = LOCKED_OUT


class TokenObtainView(TokenObtainPairView):
    """simplejwt's token view. simplejwt authenticates with the DRF request, so axes marks
    that request, not the one its middleware sees: a refusal by the lockout (which simplejwt
    reports as 401 "no active account") answers 429 locked_out with Retry-After here."""

    def post(self, request, *args, **kwargs):
        try:
            return super().post(request, *args, **kwargs)
        except AuthenticationFailed:
            if getattr(request, "axes_locked_out", False):
                raise LoginLockedOut(wait=retry_after_seconds(request)) from None
            raise
