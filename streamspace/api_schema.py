"""The OpenAPI schema lists every status code an operation can answer, in one place.

Each operation gets, beside its own success codes, the error responses any request may
meet on its way (all with the API's error body, ``Error``): bad input or a request
Django refuses, authentication, permission, a body over the size limit, throttling
where the view throttles, a server error and the database outage's 503 (and the 503 of
"no agent available")."""

from __future__ import annotations

from drf_spectacular.openapi import AutoSchema
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    """Every API error: ``error`` is a stable code, ``detail`` says what happened and what to do."""

    error = serializers.CharField()
    detail = serializers.CharField()
    field = serializers.CharField(required=False, help_text="the input field at fault")
    fields = serializers.JSONField(required=False, help_text="each invalid field and what is wrong with it")

    class Meta:
        ref_name = "Error"


# Status code -> when any operation answers it.
_ALWAYS = {
    "400": "bad input: malformed JSON or query, a NUL or control character, an invalid field",
    "401": "no, an expired or a forged credential",
    "403": "not allowed: not staff, quota exceeded, CSRF failure",
    "406": "the Accept header asks for something other than JSON",
    "413": "the request body is larger than the server accepts",
    "500": "the server failed (the error is logged, never shown)",
    "503": "the database is unavailable, or no agent can take the session",
}
_WITH_PATH_PARAMETERS = {"404": "no such object (another user's session is not found either)"}
_WITH_BODY = {"415": "the body is not application/json"}
_WRITES = {"409": "the object's state does not allow this, or it exists already"}
_THROTTLED = {"429": "too many requests: wait as Retry-After says"}


class StreamSpaceAutoSchema(AutoSchema):
    def get_operation(self, *args, **kwargs):
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        codes = dict(_ALWAYS)
        if "{" in self.path:
            codes.update(_WITH_PATH_PARAMETERS)
        if "requestBody" in operation:
            codes.update(_WITH_BODY)
        if getattr(self.view, "negotiates", True) is False:  # raw bytes in or out: no 406 nor 415
            codes.pop("406", None)
            codes.pop("415", None)
        if self.method != "GET" and "/auth/" not in self.path:
            codes.update(_WRITES)
        if self.view.get_throttles() or "/auth/" in self.path:  # login is throttled (however it is done)
            codes.update(_THROTTLED)
        responses = operation["responses"]
        for code, description in codes.items():
            if code not in responses:
                responses[code] = {**self._get_response_for_code(ErrorSerializer, code), "description": description}
        operation["responses"] = dict(sorted(responses.items()))
        return operation
