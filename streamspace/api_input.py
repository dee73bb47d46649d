"""The API refuses malformed input before any view sees it, with a 400 JSON body.

- ``StrictJSONParser`` (the API's only parser): a body nested deeper than
  ``MAX_JSON_DEPTH`` (deeper than the interpreter's recursion limit, the stdlib decoder
  raises RecursionError), and a NUL or lone surrogate in any string or key (PostgreSQL
  cannot store them), are ``malformed``, naming the field; a body over Django's
  ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is ``too_large`` (413, streamspace/api_errors.py).
- ``QueryInputMiddleware``: a NUL in an ``/api/`` path or query parameter is
  ``malformed`` too, naming the parameter.
"""

from __future__ import annotations

import io

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from agent_clients.protocol import unstorable_in
from streamspace.text import unstorable_text

MAX_JSON_DEPTH = 32


class MalformedField(ParseError):
    """A ParseError that names the field at fault (the handler adds ``field``)."""

    def __init__(self, detail: str, field: str):
        super().__init__(detail)
        self.field = field


class StrictJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        # DRF reads the body stream itself, past Django's DATA_UPLOAD_MAX_MEMORY_SIZE: apply it here
        # (a chunked body has no Content-Length to refuse it by). Django's RequestDataTooBig -> 413 JSON.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and stream is not None:
            raw = stream.read(limit + 1)
            if len(raw) > limit:
                raise RequestDataTooBig("request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE")
            stream = io.BytesIO(raw)
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels") from None
        problem = unstorable_in(data, max_depth=MAX_JSON_DEPTH)
        if problem:
            where, why = problem
            if not where:
                raise ParseError(f"JSON parse error - the body {why}")
            raise MalformedField(f"JSON parse error - {where!r} {why}", field=where)
        return data


def _malformed(detail: str, field: str | None = None) -> JsonResponse:
    body = {"error": "malformed", "detail": detail}
    if field is not None:
        body["field"] = field
    return JsonResponse(body, status=400)


class QueryInputMiddleware:
    """Refuse a NUL in an ``/api/`` path or query string (a lookup would reach PostgreSQL)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith("/api/"):
            if unstorable_text(request.path):
                return _malformed("the path holds a NUL character")
            for key, values in request.GET.lists():  # TooManyFieldsSent here: a JSON 400 (handler400)
                if unstorable_text(key) or any(unstorable_text(v) for v in values):
                    return _malformed(f"query parameter {key!r} holds a NUL character", field=key)
        return self.get_response(request)
