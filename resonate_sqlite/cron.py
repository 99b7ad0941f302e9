"""Five-field cron, read the way resonate.sql's ``_next_cron`` reads it.

``minute hour day-of-month month day-of-week``, in UTC. Each field is a comma
list of ``*``, ``N``, ``A-B``, optionally followed by ``/STEP``; ``N/STEP``
means ``N-max/STEP``. Day-of-week runs 0 (Sunday) to 6. When both day fields
are restricted (neither is literally ``*``), a day matches if *either* does,
as in Vixie cron. Names (``MON``, ``JAN``), ``7`` for Sunday, ``L``, ``W``,
``#`` and ``?`` are not cron here (resonate.sql has none of them either); a
value out of its field's range never matches, and a spec that matches nothing
within nine years is refused.

::

    >>> next_run("*/15 * * * *", 0)          # ms since the epoch
    900000
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["Cron", "CronError", "next_run", "parse"]

#: (lowest, highest) value of each field.
RANGES: Final = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
#: How far ahead a spec must match at least once.
HORIZON_YEARS: Final = 9

_SPACE = re.compile(r"[ \t\n\r\f\v]+")
_INT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*")
_INT4_MAX: Final = (1 << 31) - 1
_MINUTE: Final = timedelta(minutes=1)


class CronError(ValueError):
    """Not a cron spec this module reads, or one that never fires."""


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    """The day-of-month field is ``*``."""
    any_weekday: bool
    """The day-of-week field is ``*``."""

    def day_matches(self, when: datetime) -> bool:
        weekday = (when.weekday() + 1) % 7  # Sunday = 0
        if self.any_day and self.any_weekday:
            return True
        if self.any_day:
            return weekday in self.weekdays
        if self.any_weekday:
            return when.day in self.days
        return when.day in self.days or weekday in self.weekdays


def _int(text: str, spec: str) -> int:
    if not _INT.fullmatch(text):
        raise CronError(f"invalid cron number {text!r} in {spec!r}")
    value = int(text)
    if abs(value) > _INT4_MAX:
        raise CronError(f"cron number out of range: {text!r}")
    return value


def _part(text: str, sep: str, n: int) -> str:
    """The n-th (1-based) piece of ``text`` split on ``sep``; '' past the end."""
    pieces = text.split(sep)
    return pieces[n - 1] if n <= len(pieces) else ""


def _field(spec: str, lo: int, hi: int) -> frozenset[int]:
    """The values a field matches, restricted to ``lo..hi`` (others never match)."""
    values: set[int] = set()
    for part in spec.split(",") if spec else []:
        stepped = "/" in part
        rng = _part(part, "/", 1) if stepped else part
        step = _int(_part(part, "/", 2), spec) if stepped else 1
        if step < 1:
            raise CronError(f"invalid cron step: {spec!r}")
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = _int(_part(rng, "-", 1), spec), _int(_part(rng, "-", 2), spec)
        else:
            a = _int(rng, spec)
            b = hi if stepped else a
        values.update(v for v in range(a, min(b, hi) + 1, step) if v >= lo)
    return frozenset(values)


def parse(spec: str) -> Cron:
    """Parse a spec; raises :class:`CronError`. (It may still never fire:
    :func:`next_run` finds that out.)"""
    fields = _SPACE.split(spec.strip(" "))
    if len(fields) != 5:
        raise CronError(f"unsupported cron (need 5 fields): {spec!r}")
    mins, hours, days, months, weekdays = (
        _field(f, lo, hi) for f, (lo, hi) in zip(fields, RANGES, strict=True)
    )
    return Cron(mins, hours, days, months, weekdays, fields[2] == "*", fields[4] == "*")


def _add_years(when: datetime, years: int) -> datetime:
    try:
        return when.replace(year=when.year + years)
    except ValueError:  # 29 February
        return when.replace(year=when.year + years, day=28)


def _next_month(when: datetime) -> datetime:
    if when.month == 12:
        return when.replace(year=when.year + 1, month=1, day=1, hour=0, minute=0)
    return when.replace(month=when.month + 1, day=1, hour=0, minute=0)


def next_run(spec: str | Cron, after_ms: int) -> int:
    """The first minute strictly after the minute of ``after_ms`` that ``spec``
    matches, in ms since the epoch. Raises :class:`CronError` for a spec that
    does not parse or matches nothing within :data:`HORIZON_YEARS`."""
    cron = parse(spec) if isinstance(spec, str) else spec
    if not (cron.minutes and cron.hours and cron.months):
        raise CronError(f"no cron match within horizon: {spec!r}")
    when = datetime.fromtimestamp((after_ms // 60_000) * 60, UTC) + _MINUTE
    cutoff = _add_years(when, HORIZON_YEARS)
    while when < cutoff:
        if when.month not in cron.months:
            when = _next_month(when)
        elif not cron.day_matches(when):
            when = (when + timedelta(days=1)).replace(hour=0, minute=0)
        elif when.hour not in cron.hours:
            when = (when + timedelta(hours=1)).replace(minute=0)
        elif when.minute in cron.minutes:
            return int(when.timestamp()) * 1000
        else:
            later = [m for m in cron.minutes if m > when.minute]
            when = (
                when.replace(minute=min(later))
                if later
                else (when + timedelta(hours=1)).replace(minute=0)
            )
    raise CronError(f"no cron match within horizon: {spec!r}")
