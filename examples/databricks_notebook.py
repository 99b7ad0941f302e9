# Databricks notebook source
# A notebook run by Tether's `databricks` backend: it reads its parameters as
# widgets, reports its progress, does its work and POSTs the outcome to
# Tether's callback URL.
# docs/databricks.md shows this cell; the tests run it against a real service.
# ruff: noqa: F821  (dbutils and spark are globals Databricks gives every notebook)
import json
import time

import requests

dbutils.widgets.text("tether_callback_url", "")  # set by Tether on every run
dbutils.widgets.text("tether_job_id", "")
dbutils.widgets.text("table", "")  # this notebook's own parameter

callback_url = dbutils.widgets.get("tether_callback_url")
table = dbutils.widgets.get("table")


def report(outcome):
    """POST the outcome to Tether, retrying what may pass. A report that never
    arrives is not fatal: Tether also reads the run's final state itself."""
    if not callback_url:
        print("no tether_callback_url: started by hand, nothing to report")
        return
    for attempt in range(8):
        try:
            answer = requests.post(callback_url, json=outcome, timeout=10)
        except requests.RequestException as exc:
            print(f"callback attempt {attempt + 1} failed: {type(exc).__name__}")
        else:
            if answer.status_code < 300:
                return
            if answer.status_code in (409, 410):  # already settled, canceled or timed out
                print(f"Tether kept its earlier outcome: {answer.text[:300]}")
                return
            if answer.status_code < 500 and answer.status_code not in (408, 429):
                print(f"Tether refused the outcome ({answer.status_code}): {answer.text[:300]}")
                return
            print(f"callback attempt {attempt + 1}: Tether answered {answer.status_code}")
        time.sleep(min(2**attempt, 30))
    print("could not reach Tether; it will read the run's state instead")


def heartbeat(progress):
    """Tell Tether the run is alive and how far along it is (the job's
    `progress`); a job started with a `heartbeat_timeout` needs one at least
    that often. Best effort: a lost heartbeat only makes Tether ask Databricks."""
    if not callback_url:
        return
    path, _, token = callback_url.partition("?")
    try:
        requests.post(f"{path}/heartbeat?{token}", json={"progress": progress}, timeout=10)
    except requests.RequestException as exc:
        print(f"heartbeat failed: {type(exc).__name__}")


# The work. Replace it with yours; return a small JSON-serialisable result.
error = None
try:
    if not table:
        raise ValueError("the `table` parameter is empty")
    heartbeat({"step": "counting", "table": table})
    rows = spark.table(table).count()
    result = {"table": table, "rows": rows}
except Exception as exc:
    error = exc

if error is not None:
    report({"status": "failed", "error": {"type": type(error).__name__, "message": str(error)}})
    raise error  # the run fails too, so Tether's own check agrees with the callback

report({"status": "succeeded", "result": result})
dbutils.notebook.exit(json.dumps(result))  # outside any try: exit() works by raising
