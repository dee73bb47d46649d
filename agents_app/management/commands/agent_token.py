"""Issue or rotate an agent's token; the token is printed once and stored hashed."""

from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.services import agent_issue_token
from streamspace.errors import ServiceError


class Command(BaseCommand):
    help = "Issue a token for an agent (creating it with --platform if new), or rotate an existing one."

    def add_arguments(self, parser):
        parser.add_argument("agent_id")
        parser.add_argument("--platform", choices=Agent.Platform.values, help="create the agent if it is new")
        parser.add_argument("--region", default="")
        parser.add_argument("--quiet", action="store_true", help="print the token alone")

    def handle(self, *args, agent_id, platform, region, quiet, **options):
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            if not platform:
                raise CommandError(f"no agent {agent_id!r}; pass --platform to create it")
            from agents_app.services import agent_register

            try:
                agent, token, _ = agent_register(agent_id=agent_id, platform=platform, region=region)
            except ServiceError as exc:
                raise CommandError(exc.message) from None
            action = "created agent"
        else:
            token = agent_issue_token(agent=agent)
            action = "rotated the token of"
        if quiet:
            self.stdout.write(token)
        else:
            self.stdout.write(f"{action} {agent_id}; its token (shown once): {token}")
