"""Create the first admin: password from ADMIN_PASSWORD, or a generated one printed once."""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from streamspace.env import env_str


class Command(BaseCommand):
    help = "Create the admin user if missing (ADMIN_USERNAME, ADMIN_PASSWORD, ADMIN_EMAIL)."

    def handle(self, *args, **options):
        User = get_user_model()
        username = env_str("ADMIN_USERNAME", "admin")
        if User.objects.filter(username=username).exists():
            self.stdout.write(f"admin user {username!r} exists; nothing to do")
            return
        password = env_str("ADMIN_PASSWORD")
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email=env_str("ADMIN_EMAIL", ""), password=password)
        if generated:
            self.stdout.write(f"created admin user {username!r} with password: {password}  (shown once)")
        else:
            self.stdout.write(f"created admin user {username!r} with the password from ADMIN_PASSWORD")
