"""A worker's failed start-up in the log (`api.server.StartupLog`): the
traceback of a start that failed because the store did not answer is logged
at the first try only (then at DEBUG: the supervisor says one line a try);
any other failed start keeps it."""

from __future__ import annotations

import logging

import pytest

import api.server
from api.server import StartupLog
from tests.core.parts import logs_of

FAILED = "Application startup failed. Exiting."


@pytest.mark.parametrize(
    ("quiet", "store_down", "level"),
    [
        (False, True, "ERROR"),  # the first try: its traceback, as uvicorn logs it
        (True, True, "DEBUG"),  # a later try: the supervisor's line says it
        (True, False, "ERROR"),  # another failure keeps its traceback, however often
        (False, False, "ERROR"),
    ],
)
def test_a_failed_start_is_an_error_unless_the_store_was_down_before(
    monkeypatch: pytest.MonkeyPatch, quiet: bool, store_down: bool, level: str
):
    monkeypatch.setattr(api.server, "store_down_at_start", store_down)
    log = StartupLog(logging.getLogger("uvicorn.error"), quiet)
    traceback = "Traceback (most recent call last):\n  ...\nStoreUnavailable: token refused"
    with logs_of("uvicorn.error") as logs:
        log.info("Waiting for application startup.")
        log.error(traceback)
        log.error(FAILED)
    # a quieted traceback still says why, in its last line
    why = ["WARNING the store again: StoreUnavailable: token refused"] if level == "DEBUG" else []
    assert logs.lines == [
        "INFO Waiting for application startup.",
        *why,
        f"{level} {traceback}",
        f"{level} {FAILED}",
    ]
