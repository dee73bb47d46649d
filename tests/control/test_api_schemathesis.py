"""Schemathesis against the API's own OpenAPI schema (``/api/schema/``).

Every operation, with examples generated from the schema (valid and invalid), is called
in-process through the ASGI application (the same stack Daphne serves: middleware, DRF,
PostgreSQL) once as a plain user and once as staff, with real JWTs. Bounded examples and
a fixed seed (derandomize), so a run is the same every time. Checks: no 5xx, every
status code documented, every response body and content type as the schema says."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import make_agent

BOOTSTRAP = "bootstrap-secret-for-schemathesis"
# A 503 the API answers by design (documented, with its reason) is not a server error.
DESIGNED_503 = {"no_agent_available", "database_unavailable"}


def not_a_server_error_by_design(ctx, response, case):
    """not_a_server_error, except a 503 saying no agent can take the session (the fuzzed
    platform or region has none) or the database is unavailable."""
    if response.status_code == 503 and response.json().get("error") in DESIGNED_503:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [not_a_server_error_by_design, status_code_conformance, response_schema_conformance, content_type_conformance]


@pytest.fixture
def api_schema(transactional_db):
    from streamspace.asgi import application

    return schemathesis.openapi.from_asgi("/api/schema/", application)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def tokens(transactional_db, settings, django_user_model):
    """A plain user and a staff user, a template, an agent and a session to find; agents
    register with the bootstrap secret.

    The cheap password hasher: the token endpoint hashes every guessed password (Django
    does so even for unknown users), and PBKDF2's cost is not what this test measures."""
    from rest_framework_simplejwt.tokens import AccessToken

    from sessions_app.models import Session, Template

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.AGENT_BOOTSTRAP_TOKEN = BOOTSTRAP
    plain = django_user_model.objects.create_user("alice", password="alice-password-1")
    staff = django_user_model.objects.create_user("carol", password="carol-password-1", is_staff=True)
    template = Template.objects.create(slug="desktop", name="Desktop", image="streamspace/desktop:bookworm-3")
    Session.objects.create(owner=plain, template=template, agent=make_agent(), cpu=1, memory_mb=1024)
    return [str(AccessToken.for_user(plain)), str(AccessToken.for_user(staff))]


@schema.parametrize()
@hypothesis_settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case, tokens):
    if case.operation.path == "/api/v1/agents/register":
        tokens = [BOOTSTRAP, "not-the-bootstrap-secret"]
    for token in tokens:
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)
