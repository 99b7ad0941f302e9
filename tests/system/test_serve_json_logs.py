"""A real `tether serve --workers 2` with `TETHER_LOG_FORMAT=json`: every line
it writes, from start to stop, in the supervisor and in the workers, is one
JSON object; a job's lines carry its id; no callback token is in any of them."""

from __future__ import annotations

import json
from datetime import datetime

from tests.process import TetherProcess, wait_for


def test_every_line_of_a_json_run_is_a_json_object(tmp_path, receiver):
    receiver.callback = {"status": "succeeded"}
    proc = TetherProcess(
        tmp_path,
        {
            "TETHER_STORE": f"sqlite:///{tmp_path}/t.db",
            "TETHER_LOG_FORMAT": "json",
            "TETHER_NO_SUCH_SETTING": "1",  # a warning at start
        },
        args=("--workers", "2"),
    ).start()
    try:
        with proc.client() as client:
            body = {"id": "j-json", "backend": "http_webhook", "params": {"url": receiver.url()}}
            assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "j-json", "succeeded")
            token = receiver.hits[0].body["callback_url"].split("token=", 1)[1]
            refused = client.post("/callbacks/j-json:1", params={"token": "forged"}, json={})
            assert refused.status_code == 401
    finally:
        assert proc.terminate() == 0
    lines = [json.loads(text) for text in proc.log.read_text().splitlines()]
    for line in lines:
        assert list(line)[:4] == ["ts", "level", "logger", "msg"], line
        assert line["ts"].endswith("Z") and datetime.fromisoformat(line["ts"]).tzinfo
    levels = {line["level"] for line in lines}
    assert {"INFO", "WARNING"} <= levels
    loggers = {line["logger"] for line in lines}
    assert {"tether", "tether.http", "tether.access"} <= loggers
    access = [line for line in lines if line["logger"] == "tether.access"]
    access = [line for line in access if line["level"] == "INFO"]
    assert access and all(line["client"] == "127.0.0.1" for line in access)
    assert all(line["msg"].endswith(" ms from 127.0.0.1") for line in access)
    ours = [line for line in lines if line.get("job_id") == "j-json"]
    assert ours and all(line["backend"] == "http_webhook" for line in ours)
    assert any("finished" in line["msg"] for line in ours)
    text = proc.log.read_text()
    assert token not in text and "forged" not in text
