"""core/bounds.py: what a job keeps of a result past `TETHER_MAX_RESULT_BYTES`."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import pytest

from core.bounds import (
    FIELD_BYTES,
    MAX_DEPTH,
    PREVIEW_BYTES,
    bound_change,
    bound_external,
    bound_learnt,
    bound_outcome,
    bound_result,
    deeper_than,
    shallow,
)
from core.models import ErrorInfo, Outcome
from core.settings import Settings
from core.store.jobs import JobRecord


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


# ── a run's `external` ───────────────────────────────────────────────────────

MIB = 1_048_576


def test_an_external_within_the_bound_is_itself():
    external = {"run_id": 42, "state": "QUEUED", "note": "x" * 5_000}
    assert bound_external(external, MIB) == (external, [])
    assert bound_external(external, None) == (external, [])


def test_an_external_past_the_bound_has_its_largest_fields_cut_and_keeps_the_rest_whole():
    """What names the run (its id) stays as the backend wrote it: its
    `cancel` and `check_status` read it. 20 MB: what a QA plugin returned."""
    external = {"run_id": 42, "blob": "x" * 20_000_000, "logs": ["y" * 100] * 9_000, "s": "ok"}
    bounded, cut = bound_external(external, MIB)
    assert cut == ["blob"]  # the largest alone was enough
    assert size(bounded) <= MIB
    assert (bounded["run_id"], bounded["logs"], bounded["s"]) == (42, external["logs"], "ok")
    data = msgspec.json.encode(external["blob"])
    marker = bounded["blob"]
    assert (marker["truncated"], marker["bytes"]) == (True, len(data))
    assert marker["sha256"] == hashlib.sha256(data).hexdigest()
    assert external["blob"].startswith(marker["preview"]) and marker["preview"]
    assert size(marker) <= FIELD_BYTES
    assert bound_external(external, MIB) == (bounded, cut)  # the same every time

    tighter, cut = bound_external(external, 4096)
    assert cut == ["blob", "logs"] and size(tighter) <= 4096
    assert (tighter["run_id"], tighter["s"]) == (42, "ok")


def test_an_external_of_many_small_fields_past_the_bound_is_the_marker_whole():
    external = {f"k{n}": n for n in range(200_000)}
    bounded, cut = bound_external(external, MIB)
    assert bounded["truncated"] is True and size(bounded) <= MIB
    assert len(cut) == len(external)


def test_an_external_field_nested_too_deeply_is_the_marker_whatever_its_size():
    external = {"run_id": 1, "tree": nested(MAX_DEPTH), "fine": nested(MAX_DEPTH - 1)}
    bounded, cut = bound_external(external, MIB)
    assert cut == ["tree"]
    assert bounded["tree"]["nested_deeper_than"] == MAX_DEPTH
    assert (bounded["run_id"], bounded["fine"]) == (1, external["fine"])
    assert not deeper_than(bounded)


def test_a_change_that_keeps_the_external_within_the_bound_is_itself():
    changed = {"state": "RUNNING"}
    assert bound_change(changed, {"run_id": 1, "state": "QUEUED"}, MIB) == (changed, [])
    assert bound_change(changed, None, MIB) == (changed, [])
    assert bound_change(changed, {"run_id": 1}, None) == (changed, [])


def test_a_change_past_the_bound_has_its_largest_fields_cut():
    """`Running(external={...5 MB})`, merged into the job's `external` at
    every status check: before, stored as it was."""
    external = {"run_id": 1, "state": "QUEUED"}
    changed = {"state": "RUNNING", "blob2": "e" * 5_000_000}
    kept, cut = bound_change(changed, external, MIB)
    assert cut == ["blob2"] and kept["state"] == "RUNNING"
    assert kept["blob2"]["bytes"] == 5_000_002 and size({**external, **kept}) <= MIB


def test_a_change_that_would_grow_a_full_external_past_the_bound_leaves_its_new_fields_out():
    """Each field fits, but the job's `external` has little room left: a
    check adding a field at a time would grow it without end."""
    external = {"run_id": 1, "state": "QUEUED", "big": "b" * (MIB - 200)}
    changed = {"state": "RUNNING", "extra": "x" * 2_000}
    kept, cut = bound_change(changed, external, MIB)
    assert kept == {"state": "RUNNING"} and cut == ["extra"]


def test_learnt_fields_are_bounded_with_a_warning_naming_the_job_and_its_backend(caplog):
    rec = JobRecord(
        id="j",
        backend="mysys",
        state="running",
        params={},
        metadata={},
        timeout=60.0,
        fingerprint="f",
        deadline=0,
        created_at=0,
        updated_at=0,
        external={"run": 1},
    )
    assert bound_learnt(rec, None, MIB) is None
    assert bound_learnt(rec, (1, {"state": "RUNNING"}), MIB) == (1, {"state": "RUNNING"})
    assert not caplog.records
    attempt, kept = bound_learnt(rec, (1, {"blob": "e" * 2 * MIB}), MIB) or (0, {})
    assert attempt == 1 and kept["blob"]["truncated"] is True
    [warning] = caplog.records
    assert warning.getMessage() == (
        "job j: backend 'mysys' reported run details (Running.external) past the bound of"
        " 1048576 bytes (TETHER_MAX_RESULT_BYTES); kept cut or left out: blob"
    )

    # the same details at the next check: nothing to write, nothing said again
    # (found in review: a warning and a row write at every check, for good)
    again = msgspec.structs.replace(rec, external={"run": 1, "blob": kept["blob"]})
    assert bound_learnt(again, (1, {"blob": "e" * 2 * MIB}), MIB) is None
    assert len(caplog.records) == 1
    other = bound_learnt(again, (1, {"blob": "f" * 2 * MIB}), MIB)  # changed: kept, said
    assert other is not None and other[1]["blob"] != kept["blob"]
    assert len(caplog.records) == 2
