"""The API refuses malformed input before any view sees it, with a 400 JSON body.

- ``StrictJSONParser`` (the API's only parser): a body nested deeper than
  ``MAX_JSON_DEPTH`` (the stdlib decoder would exhaust the stack at a few thousand
  levels: RecursionError), and a NUL or lone surrogate in any string or key (PostgreSQL
  cannot store them), are ``malformed``.
- ``QueryInputMiddleware``: a NUL in an ``/api/`` path or query parameter is
  ``malformed`` too, naming the parameter.
"""

from __future__ import annotations

from django.http import JsonResponse
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from streamspace.text import unstorable_text

MAX_JSON_DEPTH = 32


def json_problem(value) -> str | None:
    """Why the decoded JSON ``value`` is refused, or None. Walks it with a stack, not recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if unstorable_text(item):
                return "a string holds a NUL character or a lone surrogate"
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if unstorable_text(key):
                        return "a key holds a NUL character or a lone surrogate"
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


class StrictJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels") from None
        problem = json_problem(data)
        if problem:
            raise ParseError(f"JSON parse error - {problem}")
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
