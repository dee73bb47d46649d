"""Create the first admin: password from ADMIN_PASSWORD, or a generated one printed once."""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from streamspace.env import env_str

CHANGE_PASSWORD_HINT = "python manage.py changepassword {username}"  # noqa: S105 (a command)


def ensure_admin() -> tuple[str, str | None, bool]:
    """Create the admin user if missing. Returns (username, the generated password or None, created)."""
    User = get_user_model()
    username = env_str("ADMIN_USERNAME", "admin")
    if User.objects.filter(username=username).exists():
        return username, None, False
    password = env_str("ADMIN_PASSWORD")
    generated = None if password else secrets.token_urlsafe(12)
    User.objects.create_superuser(username=username, email=env_str("ADMIN_EMAIL", ""), password=password or generated)
    return username, generated, True


class Command(BaseCommand):
    help = "Create the admin user if missing (ADMIN_USERNAME, ADMIN_PASSWORD, ADMIN_EMAIL)."

    def handle(self, *args, **options):
        username, generated, created = ensure_admin()
        hint = CHANGE_PASSWORD_HINT.format(username=username)
        if not created:
            self.stdout.write(f"admin user {username!r} exists; nothing to do (change its password: {hint})")
        elif generated:
            self.stdout.write(f"created admin user {username!r} with password: {generated}  (shown once)")
        else:
            self.stdout.write(f"created admin user {username!r} with the password from ADMIN_PASSWORD")
