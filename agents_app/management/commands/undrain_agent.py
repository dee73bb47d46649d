"""Let an operator-drained agent take new sessions again."""

from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.services import agent_undrain


class Command(BaseCommand):
    help = "Undo drain_agent: new sessions may land on the agent again."

    def add_arguments(self, parser):
        parser.add_argument("agent_id")

    def handle(self, *args, agent_id, **options):
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            raise CommandError(f"no agent {agent_id!r}")
        if not agent.drain_requested:
            self.stdout.write(f"agent {agent_id} was not drained by an operator; nothing to do")
            return
        agent_undrain(agent=agent)
        self.stdout.write(f"agent {agent_id} is undrained: new sessions may land on it again")
