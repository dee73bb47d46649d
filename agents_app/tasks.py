"""Celery tasks: thin wrappers around the sweeps (scheduled in streamspace/celery.py)."""

from celery import shared_task

from agents_app import sweeps


@shared_task
def sweep_agents():
    return sweeps.sweep_silent_agents()


@shared_task
def sweep_commands():
    return sweeps.sweep_commands()


@shared_task
def sweep_stuck_sessions():
    return sweeps.sweep_stuck_sessions()
