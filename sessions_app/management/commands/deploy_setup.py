"""What a deployment runs on every start, in one process (Docker Compose's `setup`
service): migrate, create the admin if missing (bootstrap_admin), create the missing demo
templates (load_demo_templates), and with --agent-id make the token in --agent-token-env
that agent's (agent_token --from-env). Every step is idempotent."""

from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Migrate, bootstrap the admin, load the demo templates and set the local agent's token from the environment."

    def add_arguments(self, parser):
        parser.add_argument("--agent-id", help="the agent whose token to set (created if new)")
        parser.add_argument("--agent-platform", default="docker", choices=["docker", "kubernetes"])
        parser.add_argument("--agent-token-env", default="AGENT_TOKEN", metavar="NAME")

    def handle(self, *args, agent_id, agent_platform, agent_token_env, **options):
        out = {"stdout": self.stdout, "stderr": self.stderr}
        call_command("migrate", interactive=False, verbosity=1, **out)
        call_command("bootstrap_admin", **out)
        call_command("load_demo_templates", **out)
        if agent_id:
            call_command("agent_token", agent_id, platform=agent_platform, from_env=agent_token_env, **out)
