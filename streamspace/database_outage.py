"""A database outage answers 503 with a reason, on every path, never a 500 page.

A view's exception reaches ``process_exception``. Elsewhere (another middleware), Django
turns an exception into a response inside each middleware layer, so an outer middleware
never sees it raised: the ``got_request_exception`` signal, sent while the exception is
being handled, marks the request when the exception is a lost or refused database
connection, and the outermost middleware replaces the error page with a 503. Either
way: the API's JSON error body (``{"error", "detail"}``, as streamspace/api_errors.py)
under ``/api/``, a readable page elsewhere. The pool's health check (settings) replaces
dropped connections, so recovery needs no restart."""

from __future__ import annotations

import logging
import sys

from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse
from django.template.loader import render_to_string

log = logging.getLogger(__name__)

# What psycopg raises, through Django, for a connection PostgreSQL dropped or refused
# (and for the pool's timeout when no connection can be had).
DATABASE_ERRORS = (OperationalError, InterfaceError)
ERROR_CODE = "database_unavailable"
DETAIL = "the control plane's database is unavailable; try again in a few seconds"
RETRY_AFTER = "5"
_MARK = "_streamspace_database_error"


def database_unavailable_response(request) -> HttpResponse:
    if request.path.startswith("/api/"):
        response = JsonResponse({"error": ERROR_CODE, "detail": DETAIL}, status=503)
    else:
        response = HttpResponse(render_to_string("503.html", {"detail": DETAIL}), status=503)
    response["Retry-After"] = RETRY_AFTER
    return response


def _note_database_error(sender, request=None, **kwargs):
    exc = sys.exc_info()[1]
    if request is not None and isinstance(exc, DATABASE_ERRORS):
        setattr(request, _MARK, exc)


got_request_exception.connect(_note_database_error, dispatch_uid="streamspace.database_outage")


class DatabaseOutageMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def process_exception(self, request, exception):
        """A view's database error: answer at once (no error page is rendered first; Django's
        debug page would query the unavailable database again from the frames' locals)."""
        if isinstance(exception, DATABASE_ERRORS):
            setattr(request, _MARK, exception)
            return database_unavailable_response(request)
        return None

    def __call__(self, request):
        response = self.get_response(request)
        exc = getattr(request, _MARK, None)
        if exc is None:
            return response
        log.warning("%s %s: database unavailable (%s)", request.method, request.path, exc.__class__.__name__)
        return database_unavailable_response(request)
