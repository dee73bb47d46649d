"""The Celery app. Every periodic task is declared here, in one place."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamspace.settings")

app = Celery("streamspace")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def declare_periodic_tasks(sender, **kwargs):
    from django.conf import settings

    every = settings.SWEEP_INTERVAL
    sender.conf.beat_schedule = {
        "sweep-agents": {"task": "agents_app.tasks.sweep_agents", "schedule": every},
        "sweep-commands": {"task": "agents_app.tasks.sweep_commands", "schedule": every},
        "sweep-stuck-sessions": {"task": "agents_app.tasks.sweep_stuck_sessions", "schedule": every * 6},
    }
