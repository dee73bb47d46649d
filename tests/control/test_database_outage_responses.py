"""The database-outage answer when the error is raised outside any view (in a middleware,
e.g. the session middleware saving the session): Django has already turned it into an
error page inside that layer, and the outermost middleware must still answer 503 with a
reason. The real-process outage is tests/chaos/test_database_outage.py; here a middleware
of this module raises the error, because no real middleware can be made to fail alone."""

import pytest
from django.db import OperationalError
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


class FailingMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        raise OperationalError("connection to server was lost")


@pytest.fixture
def client():
    return Client(raise_request_exception=False)  # answer like a server, do not re-raise


STACK = ["streamspace.database_outage.DatabaseOutageMiddleware", f"{__name__}.FailingMiddleware"]


@override_settings(MIDDLEWARE=STACK, DEBUG=True)
def test_an_api_path_answers_503_json_even_when_a_middleware_fails(client):
    response = client.get("/api/v1/sessions")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    body = response.json()
    assert body["error"] == "database_unavailable" and "database" in body["detail"]


@override_settings(MIDDLEWARE=STACK, DEBUG=True)
def test_a_portal_path_answers_a_readable_503_page_not_the_debug_page(client):
    response = client.get("/")
    assert response.status_code == 503
    html = response.content.decode()
    assert "The service is temporarily unavailable" in html
    assert "Traceback" not in html and "OperationalError" not in html
