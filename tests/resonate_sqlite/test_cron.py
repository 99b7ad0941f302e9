"""The five-field cron of schedules (resonate.sql's reading of it, in UTC).

Expected times are written out by hand; ``test_differential.py`` also
compares :func:`next_run` with resonate.sql's ``_next_cron`` itself.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from resonate_sqlite.cron import CronError, next_run, parse


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


#: 2026-01-01 was a Thursday.
START = "2026-01-01T10:07:30"


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        ("* * * * *", START, "2026-01-01T10:08"),
        ("* * * * *", "2026-01-01T10:07:00", "2026-01-01T10:08"),  # strictly after the minute
        ("*/15 * * * *", START, "2026-01-01T10:15"),
        ("5,10-12 * * * *", "2026-01-01T10:10:00", "2026-01-01T10:11"),
        ("0 * * * *", START, "2026-01-01T11:00"),
        ("30 2 * * *", START, "2026-01-02T02:30"),
        ("0 0 1 * *", START, "2026-02-01T00:00"),
        ("0 0 * * 0", START, "2026-01-04T00:00"),  # Sunday is 0
        ("0 0 * * 1-5/2", "2026-01-05T12:00", "2026-01-07T00:00"),  # Mon, Wed, Fri
        ("0 0 13 * 5", START, "2026-01-02T00:00"),  # day 13 OR a Friday
        ("0 0 */10 * *", START, "2026-01-11T00:00"),  # */10 on days: 1, 11, 21, 31
        ("7/20 * * * *", START, "2026-01-01T10:27"),  # N/STEP runs from N to the end
        ("0 0 29 2 *", START, "2028-02-29T00:00"),
        ("59 23 31 12 *", START, "2026-12-31T23:59"),
        ("  0   12 * * *  ", START, "2026-01-01T12:00"),
        ("+5 * * * *", START, "2026-01-01T11:05"),
        ("1-2-3 * * * *", START, "2026-01-01T11:01"),  # (resonate.sql reads 1-2)
    ],
)
def test_next_run(spec: str, after: str, expected: str) -> None:
    assert next_run(spec, ms(after)) == ms(expected)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "* * * *",
        "* * * * * *",
        "*/0 * * * *",
        "x * * * *",
        "1- * * * *",
        "1,,2 * * * *",
        "*/ * * * *",
        "MON * * * *",
        "99999999999 * * * *",
    ],
)
def test_malformed_specs_are_refused(spec: str) -> None:
    with pytest.raises(CronError):
        next_run(spec, ms(START))


@pytest.mark.parametrize(
    "spec", ["60 * * * *", "0 24 * * *", "0 0 32 * *", "0 0 * 13 *", "0 0 31 2 *", "0 0 * * 7"]
)
def test_specs_that_never_fire_are_refused(spec: str) -> None:
    with pytest.raises(CronError, match="no cron match"):
        next_run(spec, ms(START))


def test_a_parsed_spec_is_reusable_and_its_fields_are_sets() -> None:
    cron = parse("0,30 9-17/4 * 1,7 *")
    assert cron.minutes == {0, 30} and cron.hours == {9, 13, 17} and cron.months == {1, 7}
    assert cron.any_day and cron.any_weekday
    runs, at = [], ms(START)
    for _ in range(7):
        at = next_run(cron, at)
        runs.append(datetime.fromtimestamp(at / 1000, UTC).strftime("%m-%d %H:%M"))
    assert runs == [
        "01-01 13:00",
        "01-01 13:30",
        "01-01 17:00",
        "01-01 17:30",
        "01-02 09:00",
        "01-02 09:30",
        "01-02 13:00",
    ]
