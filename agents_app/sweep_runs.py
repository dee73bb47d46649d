"""The sweeps' heartbeat: when each last finished, and which are overdue."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents_app.models import SweepRun

# A sweep is overdue after this many of its periods without a run (and never before
# SWEEP_OVERDUE_MIN seconds, so a loaded worker is not reported dead).
MISSED_RUNS = 3


def sweep_run_record(*, name: str, changes: dict | None = None) -> None:
    """One more run of the sweep ``name``; ``changes`` (what it changed: counts by kind; a
    sweep returning anything else counts its run only) is added to its totals. Durable
    counters: /metrics reads them (streamspace/metrics.py)."""
    with transaction.atomic():
        run, _ = SweepRun.objects.select_for_update().get_or_create(name=name, defaults={"finished_at": timezone.now()})
        totals = dict(run.changes)
        for kind, count in (changes if isinstance(changes, dict) else {}).items():
            if isinstance(count, int) and not isinstance(count, bool):
                totals[kind] = totals.get(kind, 0) + count
        run.runs += 1
        run.changes = totals
        run.finished_at = timezone.now()
        run.save(update_fields=["runs", "changes", "finished_at"])


def sweeps_overdue(periods: dict[str, float]) -> list[str]:
    """One line per sweep that has not run for a few of its periods (empty: all is well)."""
    now = timezone.now()
    last = dict(SweepRun.objects.filter(name__in=periods).values_list("name", "finished_at"))
    problems = []
    for name, period in periods.items():
        allowed = max(MISSED_RUNS * period, settings.SWEEP_OVERDUE_MIN)
        short = name.rsplit(".", 1)[1]
        if name not in last:
            problems.append(f"{short} has never run")
        elif (age := (now - last[name]).total_seconds()) > allowed:
            problems.append(f"{short} last ran {age:.0f}s ago (every {period:g}s expected)")
    return problems
