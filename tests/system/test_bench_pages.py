"""The benchmark's pages phase (`bench/_pages.py`) on a small store, as
`./dev bench --phases pages` runs it: its fill goes through the job index's
own insert, so a change to the index's driver contract breaks the fill. That
went unseen once (the fill lacked `atomic`, 2026-12-02 to 12-04), because
every run since had found a database filled before the change in its cache;
the first run on a fresh machine crashed. This runs the script whole, fill
and measure, and checks that every case's rows are a scan's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_pages_phase_fills_a_fresh_cache_and_every_case_pages_as_a_scan(
    tmp_path: Path,
) -> None:
    # 3,000 jobs: enough that every "second page" case has one (a quarter
    # are tagged `nightly`, two thirds of those older than 30 days).
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"jobs": 3000, "cache": str(tmp_path / "cache"), "check": True}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "_pages.py"), str(spec), str(result)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["meta"]["jobs"] == 3000
    cases = out["cases"]
    assert len(cases) >= 30
    wrong = [c["name"] for c in cases if not c["ok"]]
    assert not wrong, f"pages differ from a scan: {wrong}"
    assert any(c["rows"] == 100 for c in cases)
    assert any(c["http"] for c in cases), "no case was asked over HTTP"
    # The filled database is kept for the next run, complete.
    assert len(list((tmp_path / "cache").glob("pages-3000-v*/meta.json"))) == 1
