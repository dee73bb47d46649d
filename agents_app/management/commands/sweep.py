"""Run every sweep once, now (what Celery beat does periodically)."""

import json

from django.core.management.base import BaseCommand

from agents_app import sweeps
from sessions_app import lifecycle


class Command(BaseCommand):
    help = "Run the agent, command, stuck-session and lifecycle sweeps once and print what they changed."

    def handle(self, *args, **options):
        result = {
            "agents": sweeps.sweep_silent_agents(),
            "commands": sweeps.sweep_commands(),
            "sessions": sweeps.sweep_stuck_sessions(),
            "lifecycle": lifecycle.sweep_lifecycle(),
        }
        self.stdout.write(json.dumps(result))
