"""Issue or rotate an agent's token; the token is printed once and stored hashed.

With ``--from-env NAME`` the token is not generated but read from the environment
variable ``NAME`` (or the file ``NAME_FILE``) and never printed: the deployment keeps it
(Docker Compose's env file), and running the command again changes nothing. Two first
runs at once (two replicas starting together) both succeed: the one that loses the race to
create the agent runs once more and finds it. The token should be at least 32 random
characters (``openssl rand -hex 32``: 64 hex digits, 256 bits); fewer than 32 printable
characters are refused."""

from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError, transaction

from agents_app.models import Agent
from agents_app.services import agent_issue_token, agent_register, agent_set_token
from streamspace.env import env_str
from streamspace.errors import Conflict, ServiceError


class Command(BaseCommand):
    help = "Issue a token for an agent (creating it with --platform if new), or rotate an existing one."

    def add_arguments(self, parser):
        parser.add_argument("agent_id")
        parser.add_argument("--platform", choices=Agent.Platform.values, help="create the agent if it is new")
        parser.add_argument("--region", default="")
        parser.add_argument("--quiet", action="store_true", help="print the token alone")
        parser.add_argument(
            "--from-env",
            metavar="NAME",
            help="set the token to the value of the environment variable NAME (or the file NAME_FILE); never printed",
        )

    def handle(self, *args, agent_id, platform, region, quiet, from_env, **options):
        wanted = None
        if from_env:
            wanted = env_str(from_env)
            if not wanted:
                raise CommandError(f"--from-env {from_env}: neither {from_env} nor {from_env}_FILE is set")
        for attempt in (1, 2):
            try:
                with transaction.atomic():  # a refused token leaves no new agent behind
                    done, token = self._token(agent_id, platform, region, wanted)
                break
            except (IntegrityError, Conflict) as exc:
                # Another run created the agent between our look-up and our insert. With
                # --from-env the second attempt finds it and sets (or keeps) the same token;
                # a generated token would silently replace the other run's: refused.
                if wanted is None or attempt == 2:
                    raise CommandError(f"agent {agent_id!r} was created by another run at the same time") from exc
            except ServiceError as exc:
                raise CommandError(exc.message) from None
        if wanted is not None:
            self.stdout.write(f"{done} {agent_id} (token from {from_env})")
        elif quiet:
            self.stdout.write(token)
        else:
            self.stdout.write(f"{done} {agent_id}; its token (shown once): {token}")

    @staticmethod
    def _token(agent_id: str, platform: str | None, region: str, wanted: str | None) -> tuple[str, str | None]:
        """(what was done, the new token when one was generated)."""
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            if not platform:
                raise CommandError(f"no agent {agent_id!r}; pass --platform to create it")
            agent, token, _ = agent_register(agent_id=agent_id, platform=platform, region=region)
            if wanted is None:
                return "created agent", token
            agent_set_token(agent=agent, raw=wanted)
            return "created agent", None
        if wanted is None:
            return "rotated the token of", agent_issue_token(agent=agent)
        return ("set the token of" if agent_set_token(agent=agent, raw=wanted) else "kept the token of"), None
