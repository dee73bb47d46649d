"""Celery tasks: thin wrappers around the sweeps (scheduled in streamspace/celery.py).

Each records its own finish time (``SweepRun``), so /readyz can tell when the sweeps
stopped running (a dead beat or worker) instead of the platform failing silently."""

import functools

from celery import shared_task

from agents_app import sweep_runs, sweeps
from sessions_app import lifecycle


def sweep_task(func):
    name = f"agents_app.tasks.{func.__name__}"

    @shared_task(name=name)
    @functools.wraps(func)
    def run():
        result = func()
        sweep_runs.sweep_run_record(name=name, changes=result)
        return result

    return run


@sweep_task
def sweep_agents():
    return sweeps.sweep_silent_agents()


@sweep_task
def sweep_commands():
    return sweeps.sweep_commands()


@sweep_task
def sweep_stuck_sessions():
    return sweeps.sweep_stuck_sessions()


@sweep_task
def sweep_lifecycle():
    return lifecycle.sweep_lifecycle()
