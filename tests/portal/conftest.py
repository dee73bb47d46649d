"""Portal fixtures: logged-in Django test clients and sessions in a chosen state."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client


def client_for(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


@pytest.fixture
def alice_client(alice):
    return client_for(alice)


@pytest.fixture
def bob_client(bob):
    return client_for(bob)


@pytest.fixture
def carol_client(carol):
    return client_for(carol)


@pytest.fixture
def make_session(template, agent):
    """A session of ``user`` through the real service, then put in ``state``."""
    from sessions_app import services
    from sessions_app.models import Session

    def make(user, state="running"):
        session = services.session_create(user=user, template_slug=template.slug)
        Session.objects.filter(pk=session.pk).update(state=state)
        session.refresh_from_db()
        return session

    return make


def json_script(html: str, element_id: str):
    """The value a ``json_script`` tag with this id carries."""
    match = re.search(rf'<script id="{re.escape(element_id)}" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no json_script #{element_id} in the page"
    return json.loads(match.group(1))


def page(response) -> str:
    return response.content.decode()
