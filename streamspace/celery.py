"""The Celery app. Every periodic task is declared here, in one place."""

import os

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, beat_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamspace.settings")

app = Celery("streamspace")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def sweep_periods() -> dict[str, float]:
    """Seconds between runs of each sweep, by task name (beat's schedule and /readyz read this)."""
    from django.conf import settings

    every = settings.SWEEP_INTERVAL
    return {
        "agents_app.tasks.sweep_agents": every,
        "agents_app.tasks.sweep_commands": every,
        "agents_app.tasks.sweep_stuck_sessions": every * 6,
        "agents_app.tasks.sweep_lifecycle": every,
    }


@app.on_after_finalize.connect
def declare_periodic_tasks(sender, **kwargs):
    sender.conf.beat_schedule = {
        task.rsplit(".", 1)[1].replace("_", "-"): {"task": task, "schedule": period}
        for task, period in sweep_periods().items()
    }


@beat_init.connect
def sweep_once_at_start(sender, **kwargs):
    """Run every sweep as soon as beat starts (beat's first run of an entry comes only after
    one period): a fresh start is swept at once and /readyz sees every sweep run."""
    for task in sweep_periods():
        app.send_task(task)


@after_setup_logger.connect
@after_setup_task_logger.connect
def json_logs(logger, **kwargs):
    """With LOG_FORMAT=json, Celery's handlers (worker, beat, task loggers) write what the
    web processes do: one JSON object per line, ``?token=`` values redacted."""
    from django.conf import settings

    if settings.LOG_FORMAT != "json":
        return
    from agent_clients.runtime.logfmt import JsonFormatter
    from streamspace.log_redaction import RedactQueryTokens

    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RedactQueryTokens())
