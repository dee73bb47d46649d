"""Load the demo templates: create the missing ones, keep what an operator edited (``--reset`` restores them)."""

from django.core.management.base import BaseCommand

from sessions_app.models import Template
from streamspace.env import env_str

DESKTOP_IMAGE = env_str("DESKTOP_IMAGE", "streamspace/desktop:bookworm-3")

DEMO_TEMPLATES = [
    {
        "slug": "debian-desktop",
        "name": "Debian desktop",
        "description": "A light Debian desktop with a terminal (TigerVNC, Openbox, xterm).",
        "image": DESKTOP_IMAGE,
        "vnc_port": 5901,
        "default_cpu": 1.0,
        "default_memory_mb": 1024,
        "volume_mount_path": "/home/user",
    },
    {
        "slug": "debian-desktop-large",
        "name": "Debian desktop (large)",
        "description": "The same desktop with 2 CPU and 2 GB of memory.",
        "image": DESKTOP_IMAGE,
        "vnc_port": 5901,
        "default_cpu": 2.0,
        "default_memory_mb": 2048,
        "volume_mount_path": "/home/user",
    },
]


class Command(BaseCommand):
    help = "Create the demo templates that are missing; --reset also restores edited ones to their defaults."

    def add_arguments(self, parser):
        parser.add_argument(
            "--reset", action="store_true", help="restore existing demo templates to their defaults (undoes edits)"
        )

    def handle(self, *args, reset=False, **options):
        for spec in DEMO_TEMPLATES:
            fields = {k: v for k, v in spec.items() if k != "slug"}
            if reset:
                _, created = Template.objects.update_or_create(slug=spec["slug"], defaults=fields)
                verb = "created" if created else "reset"
            else:
                _, created = Template.objects.get_or_create(slug=spec["slug"], defaults=fields)
                verb = "created" if created else "kept"
            self.stdout.write(f"{verb} template {spec['slug']}")
