"""Stop placing new sessions on an agent; its sessions keep running."""

from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.services import agent_set_draining


class Command(BaseCommand):
    help = "Mark an agent draining: no new sessions land on it."

    def add_arguments(self, parser):
        parser.add_argument("agent_id")

    def handle(self, *args, agent_id, **options):
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            raise CommandError(f"no agent {agent_id!r}")
        agent_set_draining(agent=agent)
        live = agent.sessions.exclude(state__in=("terminated", "failed")).count()
        self.stdout.write(f"agent {agent_id} is draining; {live} live sessions stay where they are")
