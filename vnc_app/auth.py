"""Socket authentication for the VNC relay: a ``?token=<JWT>`` beside the login cookie."""

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


class JWTQueryAuthMiddleware:
    """If the query string carries ``token``, it decides the user (a bad token means anonymous)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        raw = (query.get("token") or [""])[0]
        if raw:
            from django.contrib.auth.models import AnonymousUser

            scope = dict(scope, user=(await _user_from_jwt(raw)) or AnonymousUser(), token_auth=True)
        return await self.app(scope, receive, send)
