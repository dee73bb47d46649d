"""Exit 1 when the periodic sweeps have stopped running (Celery beat or worker dead)."""

from django.core.management.base import BaseCommand, CommandError

from streamspace.health import sweeps_check


class Command(BaseCommand):
    help = (
        "Say whether every periodic sweep ran within 3 of its periods; exit 1 if not "
        "(a liveness probe for Celery beat: see deploy/kubernetes/base/celery.yaml)."
    )

    def handle(self, *args, **options):
        state = sweeps_check()
        if state != "ok":
            raise CommandError(f"sweeps: {state}")
        self.stdout.write("sweeps: ok")
