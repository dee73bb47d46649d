"""The login session store: Django's database sessions, refusing a session key that no
session of ours can have before it reaches the database.

A cookie ``sessionid="\\000\\000\\000\\000\\000\\000\\000\\000"`` (valid ASCII, quoted) is
decoded by Django into eight NUL characters; the stock store checks only the key's length,
so PostgreSQL was asked for it and refused (a 500 on every page and API call, and a crash in
the viewer socket's authentication). Keys Django makes are lower-case letters and digits."""

from __future__ import annotations

from django.contrib.sessions.backends.base import VALID_KEY_CHARS
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore

_VALID = frozenset(VALID_KEY_CHARS)


class SessionStore(DatabaseSessionStore):
    def _validate_session_key(self, key):
        return super()._validate_session_key(key) and _VALID.issuperset(key)
