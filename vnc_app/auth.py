"""Socket authentication for the VNC relay, beside the login cookie (what the viewer page
uses): an API client's JWT, in an ``Authorization: Bearer <JWT>`` header or, for clients
that cannot set headers, in ``?token=<JWT>`` (its value is redacted from our logs,
streamspace/log_redaction.py)."""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import AccessToken


@database_sync_to_async
def _user_from_jwt(raw: str):
    try:
        token = AccessToken(raw)
    except TokenError:
        return None
    user_id = token.get(api_settings.USER_ID_CLAIM)
    return get_user_model().objects.filter(**{api_settings.USER_ID_FIELD: user_id}, is_active=True).first()


def _jwt_of(scope) -> str:
    """The JWT the client presents: the Bearer header first, else ``?token=``; "" if none."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return (query.get("token") or [""])[0]


class JWTQueryAuthMiddleware:
    """If the socket carries a JWT, it decides the user (a bad one means anonymous), and
    the socket counts as token-authenticated (no origin check: no cookie is involved)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        raw = _jwt_of(scope)
        if raw:
            from django.contrib.auth.models import AnonymousUser

            scope = dict(scope, user=(await _user_from_jwt(raw)) or AnonymousUser(), token_auth=True)
        return await self.app(scope, receive, send)
