"""The one check for text a user or an agent sends: what a string must not hold.

PostgreSQL refuses NUL in text (a 500 before this check), and a lone surrogate cannot be
encoded to UTF-8 for it either; control characters have no place in names, tags,
regions or versions. Every text input is checked here: the API's JSON parser and
query-parameter check (streamspace/api_input.py), the serializers' text fields
(``refuse_control_characters``) and the services' own validation (tags)."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from rest_framework import serializers

from agent_clients.protocol import CONTROL, MAX_DEPTH, UNSTORABLE, unstorable_in  # NUL and lone surrogates

# Every C0 control character, DEL and the C1 controls (protocol.CONTROL), with the unstorable ones.
_CONTROL = re.compile(f"{CONTROL.pattern}|{UNSTORABLE.pattern}")


def unstorable_text(value: str) -> bool:
    """True when the database cannot store ``value`` as text (NUL or a lone surrogate)."""
    return UNSTORABLE.search(value) is not None


def has_control_characters(value: str) -> bool:
    """True when ``value`` holds a control character (tabs and newlines included) or cannot be stored."""
    return _CONTROL.search(value) is not None


def refuse_control_characters(value):
    """Validator for a serializer's one-line text field (names, ids, tags, regions, versions)."""
    if isinstance(value, str) and has_control_characters(value):
        raise serializers.ValidationError("must not contain NUL or other control characters", code="control_character")
    return value


class PlainTextField(serializers.CharField):
    """A one-line text field: a JSON string (DRF's CharField would take the number 0 as
    "0"), without NUL or other control characters."""

    default_error_messages = {"invalid": "Not a valid string."}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.validators.append(refuse_control_characters)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def validate_storable_json(value):
    """Validator for a model's JSONField (the admin's forms): PostgreSQL refuses a NUL in
    jsonb (a 500 before this check); deep nesting has no place in settings either."""
    if problem := unstorable_in(value, max_depth=MAX_DEPTH):
        where, why = problem
        raise ValidationError(f"{where or 'the value'} {why}", code="unstorable")
