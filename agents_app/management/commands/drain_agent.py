"""Stop placing new sessions on an agent; its sessions keep running."""

from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.services import agent_drain


class Command(BaseCommand):
    help = "Drain an agent: no new sessions land on it (its sessions keep running) until undrain_agent."

    def add_arguments(self, parser):
        parser.add_argument("agent_id")

    def handle(self, *args, agent_id, **options):
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            raise CommandError(f"no agent {agent_id!r}")
        live = agent_drain(agent=agent)
        self.stdout.write(
            f"agent {agent_id} is draining: no new sessions land on it; its {live} live session(s) keep running. "
            f"Undo with: manage.py undrain_agent {agent_id}"
        )
