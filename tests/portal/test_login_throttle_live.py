"""Login throttling through a real Daphne (issue 10). ``POST /api/v1/auth/token``:
simplejwt's view authenticates with the DRF request, and the lockout must reach the client
as JSON 429 with Retry-After, not as the 401 "no active account" that hides it. The portal
form: under ASGI axes' middleware runs its async path, which calls the lockout page
differently from the sync one the Django test client uses."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest
from django.core.management import call_command

pytestmark = [pytest.mark.django_db(transaction=True)]


def token(cp, username: str, password: str) -> tuple[int, dict, dict]:
    body = json.dumps({"username": username, "password": password}).encode()
    req = urllib.request.Request(cp.http_url + "/api/v1/auth/token", data=body, method="POST")  # noqa: S310
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (loopback)
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_the_token_endpoint_locks_after_five_failures_and_staff_can_clear_it(control_plane, django_user_model):
    django_user_model.objects.create_user("alice", password="alice-password-1")
    answers = [token(control_plane, "alice", "wrong") for _ in range(5)]
    assert [status for status, _, _ in answers[:4]] == [401] * 4
    for status, headers, body in (answers[4], token(control_plane, "alice", "alice-password-1")):
        assert status == 429, body
        assert body["error"] == "locked_out" and "Too many failed log-ins" in body["detail"]
        assert 0 < int(headers["Retry-After"]) <= 300
        assert headers["Content-Type"] == "application/json"
        assert "access" not in body
    call_command("axes_reset_username", "alice")
    status, _, body = token(control_plane, "alice", "alice-password-1")
    assert status == 200 and body["access"]


def test_one_address_is_locked_across_user_names(control_plane, django_user_model):
    django_user_model.objects.create_user("bob", password="bob-password-1")
    for name in ("u1", "u2", "u3", "u4", "u5"):
        token(control_plane, name, "guess")
    status, headers, body = token(control_plane, "bob", "bob-password-1")
    assert status == 429 and body["error"] == "locked_out" and int(headers["Retry-After"]) > 0
    call_command("axes_reset_ip", "127.0.0.1")
    assert token(control_plane, "bob", "bob-password-1")[0] == 200


def portal_login(cp, username: str, password: str) -> tuple[int, dict, str]:
    """GET the form (CSRF cookie and token), then POST it, as a browser would."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(cp.http_url + "/accounts/login/", timeout=10) as r:
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', r.read().decode()).group(1)
    form = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": csrf})
    req = urllib.request.Request(cp.http_url + "/accounts/login/", data=form.encode(), method="POST")  # noqa: S310
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_the_portal_form_through_daphne_answers_429_with_retry_after(control_plane, django_user_model):
    django_user_model.objects.create_user("alice", password="alice-password-1")
    answers = [portal_login(control_plane, "alice", "wrong") for _ in range(5)]
    assert [status for status, _, _ in answers[:4]] == [200] * 4
    for status, headers, page in (answers[4], portal_login(control_plane, "alice", "alice-password-1")):
        assert status == 429
        assert 0 < int(headers["Retry-After"]) <= 300
        assert "Too many failed log-ins" in page and "Try again in 5 minutes" in page
