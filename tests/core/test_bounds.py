"""core/bounds.py: what a job keeps of a result past `TETHER_MAX_RESULT_BYTES`."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import pytest

from core.bounds import MAX_DEPTH, PREVIEW_BYTES, bound_outcome, bound_result, deeper_than, shallow
from core.models import ErrorInfo, Outcome
from core.settings import Settings


def size(value: Any) -> int:
    return len(msgspec.json.encode(value))


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "short",
        {"rows": 3},
        ["x" * 1000],
    ],
)
def test_a_result_within_the_bound_is_itself(value: Any):
    assert bound_result(value, 1024) is value


@pytest.mark.parametrize(
    "value",
    [
        {"rows": list(range(5000))},
        ['"quoted" \\ ' * 400],  # escaping makes the preview longer than its text
        "\x01" * 3000,  # each escaped in 6 bytes
        "é€𝄞" * 2000,  # never cut inside a character
        [{"k": "v" * 10}] * 300,
    ],
)
@pytest.mark.parametrize("limit", [1024, 1500, 4096])
def test_a_larger_one_is_a_marker_that_fits(value: Any, limit: int):
    whole = msgspec.json.encode(value)
    marker = bound_result(value, limit)
    assert size(marker) <= limit
    assert marker["truncated"] is True
    assert marker["bytes"] == len(whole)
    assert marker["sha256"] == hashlib.sha256(whole).hexdigest()
    text = value if isinstance(value, str) else whole.decode()
    assert text.startswith(marker["preview"])
    assert len(marker["preview"]) > 0
    assert bound_result(value, limit) == marker  # the same every time


def test_a_marker_a_backend_made_keeps_its_keys_and_is_cut_further():
    cut = {"truncated": True, "preview": "y" * 5000, "truncated_by": "databricks"}
    bounded = bound_result(cut, 1024)
    assert bounded["truncated_by"] == "databricks" and "bytes" not in bounded
    assert "y" * 100 in bounded["preview"] and size(bounded) <= 1024
    marker_like = {"truncated": True, "preview": 3, "x": "z" * 5000}  # not one: cut whole
    assert set(bound_result(marker_like, 1024)) == {"truncated", "bytes", "sha256", "preview"}


def test_an_outcome_is_bounded_in_its_result_and_error_message():
    small = Outcome(status="succeeded", result={"a": 1})
    assert bound_outcome(small, 1024) is small
    assert bound_outcome(Outcome(status="succeeded", result="x" * 5000), None).result == "x" * 5000
    failed = Outcome(
        status="failed", result="x" * 2000, error=ErrorInfo(message="m" * 3000, type="T")
    )
    bounded = bound_outcome(failed, 1024)
    assert bounded.status == "failed" and bounded.result["truncated"] is True
    assert bounded.error == ErrorInfo(
        message="m" * (1024 - len("… (cut from 3000 bytes)".encode())) + "… (cut from 3000 bytes)",
        type="T",
    )
    assert len(bounded.error.message.encode()) == 1024


def test_the_setting_defaults_to_a_mebibyte_and_refuses_less_than_a_kibibyte():
    assert Settings.from_env({}).max_result_bytes == 1 << 20
    assert Settings.from_env({"TETHER_MAX_RESULT_BYTES": "4096"}).max_result_bytes == 4096
    with pytest.raises(ValueError, match="TETHER_MAX_RESULT_BYTES"):
        Settings.from_env({"TETHER_MAX_RESULT_BYTES": "100"})


def nested(levels: int, leaf: Any = 1) -> Any:
    """`levels` of alternating objects and arrays around `leaf`."""
    value = leaf
    for n in range(levels):
        value = {"k": value} if n % 2 else [value]
    return value


@pytest.mark.parametrize("levels", [0, 1, 2, MAX_DEPTH - 1, MAX_DEPTH])
def test_a_value_within_the_depth_is_not_deeper(levels: int):
    assert not deeper_than(nested(levels))
    if levels:
        assert not deeper_than({"a": 1, "b": nested(levels - 1)})


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 5_000, 200_000])
def test_a_value_past_the_depth_is_deeper_at_any_depth_without_recursion(levels: int):
    assert deeper_than(nested(levels))
    assert deeper_than([1, {"x": "y"}, nested(levels)])  # past siblings
    assert not deeper_than(nested(levels), levels)


def test_the_depth_counts_objects_and_arrays_not_scalars():
    assert deeper_than([[1]], 1) and not deeper_than([1, "two", None], 1)
    assert not deeper_than("text", 0) and deeper_than({}, 0)


def test_a_result_nested_too_deeply_is_the_marker_with_its_preview():
    result = nested(MAX_DEPTH + 1, "x" * 5_000)
    data = msgspec.json.encode(result)
    kept = shallow(Outcome(status="succeeded", result=result, error=ErrorInfo("e", "t")))
    assert kept.result == {
        "truncated": True,
        "nested_deeper_than": MAX_DEPTH,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "preview": data[:PREVIEW_BYTES].decode(),
    }
    assert (kept.status, kept.error) == ("succeeded", ErrorInfo("e", "t"))
    within = Outcome(status="succeeded", result=nested(MAX_DEPTH))
    assert shallow(within) is within


def test_a_result_too_deep_even_to_write_out_is_the_marker_without_a_preview():
    kept = shallow(Outcome(status="failed", result=nested(200_000)))
    assert kept.result == {"truncated": True, "nested_deeper_than": MAX_DEPTH, "preview": ""}
