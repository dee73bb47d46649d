"""One exception handler for the whole API: every error is JSON naming the problem."""

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.http import JsonResponse
from django.views import defaults as django_defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from sessions_app.states import IllegalTransition
from streamspace.errors import ServiceError


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        body = {"error": exc.code, "detail": exc.message}
        if exc.field:
            body["field"] = exc.field
        return Response(body, status=exc.status)
    if isinstance(exc, IllegalTransition):
        return Response({"error": "conflict", "detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = {"error": "invalid", "detail": "invalid input", "fields": response.data}
    elif isinstance(exc, exceptions.ParseError):
        response.data = {"error": "malformed", "detail": str(exc.detail)}
        if getattr(exc, "field", None):
            response.data["field"] = exc.field
    else:
        detail = response.data.get("detail", "") if isinstance(response.data, dict) else response.data
        code = getattr(exc, "default_code", "error")
        response.data = {"error": code, "detail": str(detail)}
    return response


# --- Django's own error views: JSON under /api/, Django's pages elsewhere -------------------
# (streamspace/urls.py names them as handler400/403/404/500). Django calls them with DEBUG
# off; the 500 view runs after Django has logged the traceback ("django.request"), and the
# body never holds it.


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def bad_request(request, exception):
    """Django's 400: a request it refused before any view (too many fields, an oversized
    form body, a disallowed host), raised as SuspiciousOperation or BadRequest."""
    if not _is_api(request):
        return django_defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return JsonResponse(
            {"error": "too_large", "detail": "the request body is larger than the server accepts"}, status=413
        )
    if isinstance(exception, TooManyFieldsSent):
        return JsonResponse({"error": "too_many_fields", "detail": "the request has too many parameters"}, status=400)
    return JsonResponse({"error": "bad_request", "detail": "the request was refused"}, status=400)


def permission_denied(request, exception):
    if not _is_api(request):
        return django_defaults.permission_denied(request, exception)
    return JsonResponse({"error": "permission_denied", "detail": "you may not do this"}, status=403)


def page_not_found(request, exception):
    if not _is_api(request):
        return django_defaults.page_not_found(request, exception)
    return JsonResponse({"error": "not_found", "detail": f"no API endpoint at {request.path}"}, status=404)


def server_error(request):
    if not _is_api(request):
        return django_defaults.server_error(request)
    return JsonResponse({"error": "server_error", "detail": "the server failed; the error is logged"}, status=500)
