"""`core.models.read_json`: JSON read as msgspec reads it, each open float
by Python's `float` (msgspec's own reading of floats near the ends of the
double range took 0.3-0.45 s a MiB, a QA pass, 2026-12-07), a number out of
range refused as msgspec refuses it; and every reader of a job's JSON uses
it."""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest

import core.models
from core.models import json_decoder, read_json
from core.store.schema import EVENT_ROWS, JOB_ROWS, NOTIFICATION_ROWS


def test_numbers_read_as_msgspec_reads_them():
    rng = random.Random(3)
    numbers = [
        "1.7976931348623157e308", "2.2250738585072011e-308", "4.9e-324", "1e-400", "-0.0",
        "0", "-1", "123456789012345678901234567890", "3.14", "1E5", "-2.5e-3", "1.0",
    ]  # fmt: skip
    numbers += [repr(rng.uniform(-1, 1) * 10 ** rng.randint(-320, 308)) for _ in range(2000)]
    data = ("[" + ",".join(numbers) + "]").encode()
    read, theirs = read_json(data), msgspec.json.decode(data)
    assert read == theirs
    assert [math.copysign(1, x) for x in read if x == 0] == [
        math.copysign(1, x) for x in theirs if x == 0
    ]
    assert {"a": read} == read_json(msgspec.json.encode({"a": read}))


@pytest.mark.parametrize("number", ["1e400", "-1e400", "9" * 5000])
def test_a_number_out_of_range_is_refused_as_msgspec_refuses_it(number: str):
    data = f'{{"a": [1, {number}]}}'.encode()
    with pytest.raises(msgspec.ValidationError) as ours:
        read_json(data)
    with pytest.raises(msgspec.ValidationError) as theirs:
        msgspec.json.decode(data)
    assert str(ours.value) == str(theirs.value)


def test_typed_reads_keep_their_types():
    assert read_json(b'{"a": 1.5}', dict[str, float]) == {"a": 1.5}
    with pytest.raises(msgspec.ValidationError):
        read_json(b'{"a": "x"}', dict[str, float])


def test_every_json_column_of_a_row_is_read_so():
    """The job row is read at every look at a job (a page, the dashboard):
    each JSON column goes through `json_decoder`'s float reading."""
    for rows in (JOB_ROWS, EVENT_ROWS, NOTIFICATION_ROWS):
        scope: dict[str, Any] = rows.decode.__globals__
        decoders = [v for k, v in scope.items() if k.startswith("decode_")]
        assert len(decoders) == sum(c.type == "json" for c in rows.table.columns)
        for decode in decoders:
            assert decode.__self__.float_hook is json_decoder(Any).float_hook, rows.table.name


def test_floats_are_read_by_python(monkeypatch):
    """Each float a type leaves open goes through `_float` (Python's
    `float`), not msgspec's own reading (0.3-1 s a MiB near the ends of the
    double range): a text of them calls it once for each."""
    seen: list[str] = []

    def counted(literal: str) -> float:
        seen.append(literal)
        return float(literal)

    monkeypatch.setattr(core.models, "_float", counted)
    json_decoder.cache_clear()
    try:
        assert read_json(b"[1.5e300, 2, 2.5]") == [1.5e300, 2, 2.5]
        assert seen == ["1.5e300", "2.5"]
        assert read_json(msgspec.Raw(b'{"a": 0.5}')) == {"a": 0.5} and seen[-1] == "0.5"
    finally:
        json_decoder.cache_clear()
