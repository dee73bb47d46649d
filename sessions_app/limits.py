"""The CPU and memory a session may ask for: one check for the API, the portal, the
admin's templates and the quota, so that no request rounds to "no limit" downstream."""

from __future__ import annotations

import math

from django.conf import settings
from django.db.models import Value
from django.db.models.functions import Greatest

from streamspace.errors import InvalidInput


def validate_cpu(value, *, field: str = "cpu") -> float:
    """Cores between SESSION_MIN_CPU and SESSION_MAX_CPU; NaN, inf and non-numbers refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput("cpu must be a number of cores", field=field)
    low, high = settings.SESSION_MIN_CPU, settings.SESSION_MAX_CPU
    try:
        cores = float(value)
    except OverflowError:  # an integer too large for a float
        cores = math.inf
    if not (math.isfinite(cores) and low <= cores <= high):
        raise InvalidInput(f"cpu must be between {low:g} and {high:g} cores", field=field)
    return cores


def validate_memory(value, *, field: str = "memory_mb") -> int:
    """Whole megabytes between SESSION_MIN_MEMORY_MB and SESSION_MAX_MEMORY_MB."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("memory_mb must be a whole number of megabytes", field=field)
    low, high = settings.SESSION_MIN_MEMORY_MB, settings.SESSION_MAX_MEMORY_MB
    if not low <= value <= high:
        raise InvalidInput(f"memory_mb must be between {low} and {high} megabytes", field=field)
    return value


def charged_cpu(field: str = "cpu"):
    """The CPU a session counts for, as a database expression: at least SESSION_MIN_CPU (a
    session stored before the minimum existed is charged the minimum, not less). The one rule
    for quotas, placement and the dashboard's reserved figures."""
    return Greatest(field, Value(settings.SESSION_MIN_CPU))


def charged_memory(field: str = "memory_mb"):
    """The memory a session counts for: at least SESSION_MIN_MEMORY_MB (see charged_cpu)."""
    return Greatest(field, Value(settings.SESSION_MIN_MEMORY_MB))
