"""The OpenAPI document says what the service accepts and answers, and the docs
page at /schema works with no internet."""

from __future__ import annotations

import importlib.metadata
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from api.controllers import CALLBACK_STATUS, INTEGER_RULE
from core.models import JOB_ID_PATTERN, TAG_PATTERN
from core.views import CURSOR_PATTERN
from tests.conftest import Service

OPERATIONS = {
    ("post", "/jobs"): "createJob",
    ("get", "/jobs"): "listJobs",
    ("get", "/jobs/{job_id}"): "getJob",
    ("get", "/jobs/{job_id}/events"): "jobEvents",
    ("post", "/jobs/{job_id}/retry"): "retryJob",
    ("post", "/jobs/{job_id}/cancel"): "cancelJob",
    ("post", "/callbacks/{promise_id}"): "settleJob",
    ("post", "/callbacks/{promise_id}/heartbeat"): "heartbeat",
    ("post", "/backends/{name}/notifications"): "backendNotification",
    ("get", "/health"): "health",
}


async def document(svc: Service) -> dict[str, Any]:
    response = await svc.client.get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        OPERATIONS[(method, path)]: op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }


async def test_every_operation_is_described_and_the_version_is_the_packages(start_service):
    svc = await start_service()
    doc = await document(svc)
    assert doc["info"]["version"] == importlib.metadata.version("tether")
    assert "400" in doc["info"]["description"] and "422" in doc["info"]["description"]
    ops = operations(doc)
    assert set(ops) == set(OPERATIONS.values())
    for name, op in ops.items():
        assert op["operationId"] == name
        assert len(op.get("description", "")) > 60, name  # the handler's docstring
        assert op.get("summary"), name


async def test_every_answer_is_declared_with_a_realistic_example(start_service):
    svc = await start_service()
    ops = operations(await document(svc))
    declared = {name: set(op["responses"]) for name, op in ops.items()}
    assert declared["createJob"] >= {"200", "201", "400", "409", "413", "415", "422", "503"}
    for guarded in ("createJob", "listJobs", "getJob", "jobEvents", "cancelJob", "retryJob"):
        assert "429" in declared[guarded], guarded  # too many wrong tokens (test_wrong_tokens)
    assert declared["cancelJob"] >= {"200", "400", "404", "409", "413", "415", "503"}
    assert declared["settleJob"] >= {"200", "202", "400", "401", "404", "409", "410", "422"}
    assert declared["settleJob"] >= {str(s) for s in CALLBACK_STATUS.values()}
    assert declared["heartbeat"] >= {"200", "400", "401", "404", "410", "413", "422", "503"}
    codes = {"invalid_request", "unauthorized", "not_found", "conflict", "body_too_large"}
    codes |= {"unsupported_media_type", "store_unavailable", "forbidden", "gone"}
    codes |= {"too_many_requests"}
    for name, op in ops.items():
        for status, response in op["responses"].items():
            media = response["content"]["application/json"]
            examples = [e["value"] for e in media.get("examples", {}).values()]
            assert examples, (name, status)
            for example in examples:
                outcome = name == "settleJob" and status in ("409", "410")
                if int(status) >= 400 and not outcome:
                    assert example["error"]["code"] in codes, (name, status, example)
                    assert " " in example["error"]["message"], (name, status, example)
    canceled = ops["cancelJob"]["responses"]["200"]["content"]["application/json"]["examples"]
    [job] = [e["value"] for e in canceled.values()]
    assert job["state"] == "canceled"
    assert job["error"]["message"].startswith("canceled by request: ")
    accepted = ops["settleJob"]["responses"]["200"]["content"]["application/json"]["examples"]
    assert {e["value"]["outcome"] for e in accepted.values()} == {"accepted", "duplicate"}


async def test_post_jobs_documents_each_backends_params(start_service):
    svc = await start_service()
    doc = await document(svc)
    schemas = doc["components"]["schemas"]
    body = operations(doc)["createJob"]["requestBody"]
    assert body["required"] is True
    media = body["content"]["application/json"]
    assert media["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    assert {e["value"]["backend"] for e in media["examples"].values()} == {
        "databricks",
        "databricks_sql",
        "http_webhook",
    }
    request = schemas["JobRequest"]
    variants = {
        "http_webhook": "#/components/schemas/HttpWebhookJobRequest",
        "databricks": "#/components/schemas/DatabricksJobRequest",
        "databricks_sql": "#/components/schemas/DatabricksSqlJobRequest",
    }
    assert request["discriminator"] == {"propertyName": "backend", "mapping": variants}
    assert sorted(r["$ref"] for r in request["oneOf"]) == sorted(variants.values())
    for example in media["examples"].values():  # each names only fields its variant has
        variant = schemas[variants[example["value"]["backend"]].rsplit("/", 1)[1]]
        assert variant["additionalProperties"] is False
        assert set(example["value"]) <= set(variant["properties"]), example
    assert "notify" in schemas["HttpWebhookJobRequest"]["properties"]
    webhook = schemas["HttpWebhookJobRequest"]
    assert webhook["additionalProperties"] is False
    assert webhook["required"] == ["backend", "params"]
    assert webhook["properties"]["backend"]["enum"] == ["http_webhook"]
    assert webhook["properties"]["params"]["$ref"] == "#/components/schemas/WebhookParams"
    params = schemas["WebhookParams"]
    assert params["additionalProperties"] is False
    assert params["required"] == ["url"]
    assert params["properties"]["timeout"]["default"] == 10.0
    assert schemas["DatabricksJobRequest"]["properties"]["params"]["$ref"] == (
        "#/components/schemas/DatabricksParams"
    )
    assert "SubmitRun" in schemas
    timeout = webhook["properties"]["timeout"]["anyOf"][0]
    assert timeout == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": svc.settings.max_timeout,
    }
    beat = webhook["properties"]["heartbeat_timeout"]["anyOf"][0]
    assert beat == {"type": "number", "minimum": 1.0, "maximum": svc.settings.max_timeout}
    job_id = webhook["properties"]["id"]["anyOf"][0]
    assert job_id["pattern"] == JOB_ID_PATTERN.pattern and job_id["maxLength"] == 128
    tags = webhook["properties"]["tags"]
    assert (tags["type"], tags["maxItems"], tags["uniqueItems"]) == ("array", 16, True)
    assert tags["items"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 64,
        "pattern": "^[A-Za-z0-9._:/=-]{1,64}$",
    }


async def test_the_document_states_what_the_server_refuses(start_service):
    svc = await start_service()
    doc = await document(svc)
    ops = operations(doc)
    params = {p["name"]: p for p in ops["listJobs"]["parameters"]}
    assert set(params) == {
        "state",
        "backend",
        "tag",
        "created_after",
        "created_before",
        "limit",
        "cursor",
    }
    assert params["state"]["schema"]["type"] == "array"
    assert params["state"]["schema"]["items"]["enum"] == [
        "queued",
        "pending",
        "running",
        "succeeded",
        "failed",
        "canceled",
        "timed_out",
    ]
    assert params["state"]["explode"] is True
    assert params["tag"]["schema"]["items"]["pattern"] == TAG_PATTERN.pattern, params["tag"]
    # any name but an empty one (none has it), to find orphans
    assert params["backend"]["schema"]["items"] == {"type": "string", "minLength": 1}
    assert params["cursor"]["schema"]["pattern"] == CURSOR_PATTERN
    assert params["tag"]["explode"] is True
    assert params["tag"]["schema"]["maxItems"] == 16
    assert params["created_after"]["schema"]["format"] == "date-time"
    assert (params["limit"]["schema"]["minimum"], params["limit"]["schema"]["maximum"]) == (1, 1000)
    for operation in ("listJobs", "jobEvents"):  # no `pattern` on an integer: said in words
        limit = next(p for p in ops[operation]["parameters"] if p["name"] == "limit")
        assert limit["schema"]["type"] == "integer"
        assert limit["description"].endswith(INTEGER_RULE), limit
    for param in params.values():
        assert "null" not in str(param["schema"])
    schemas = doc["components"]["schemas"]
    cancel = ops["cancelJob"]["requestBody"]
    assert cancel["required"] is False
    assert schemas["CancelRequest"]["additionalProperties"] is False
    assert schemas["CancelRequest"]["properties"]["reason"]["anyOf"][0]["maxLength"] == 1000
    assert schemas["CallbackBody"]["required"] == ["status"]
    assert schemas["CallbackBody"]["additionalProperties"] is False
    # the job list's stream, and the wait a 503 asks for, are stated (an exploratory QA pass)
    assert "text/event-stream" in ops["listJobs"]["responses"]["200"]["content"]
    for op in ops.values():
        for status in ("429", "503"):
            if status in op["responses"]:
                retry_after = op["responses"][status]["headers"]["Retry-After"]
                assert retry_after["schema"] == {"type": "integer"}
    # a path's id is looked up as given: one outside the pattern is 404, as the document says
    path_id = ops["getJob"]["parameters"][0]
    assert path_id["schema"] == {"type": "string", "minLength": 1}
    assert JOB_ID_PATTERN.pattern in path_id["description"]
    odd = await svc.client.get("/jobs/a%20b")
    assert odd.status_code == 404 and odd.json()["error"]["message"] == "no job 'a b'"
    links = ops["createJob"]["responses"]["201"]["links"]
    assert links["getJob"]["parameters"] == {"job_id": "$response.body#/id"}


@pytest.mark.parametrize(
    ("api_token", "read_token"), [("", ""), ("secret-token", ""), ("one,two", "read-token")]
)
async def test_the_bearer_scheme_is_declared_where_a_token_is_needed(
    start_service, api_token, read_token
):
    svc = await start_service(api_token=api_token, read_token=read_token)
    doc = await document(svc)
    schemes = doc["components"]["securitySchemes"]
    ops = operations(doc)
    assert ops["settleJob"]["security"] == [{"callbackToken": []}, {"callbackBearer": []}]
    assert schemes["callbackToken"] == {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": schemes["callbackToken"]["description"],
    }
    assert "security" not in ops["health"]
    jobs = ("createJob", "listJobs", "getJob", "cancelJob")
    if api_token:
        assert schemes["apiToken"]["type"] == "http"
        assert schemes["apiToken"]["scheme"] == "bearer"
        assert all(ops[name]["security"] == [{"apiToken": []}] for name in jobs)
        assert (
            "`TETHER_READ_TOKEN`) is accepted the same way on GET only"
            in (schemes["apiToken"]["description"])
        )
        assert all("403" in ops[name]["responses"] for name in ("createJob", "cancelJob"))
        assert not any("403" in ops[name]["responses"] for name in ("listJobs", "getJob"))
    else:
        assert "apiToken" not in schemes
        assert not any("security" in ops[name] for name in jobs)


class Page(HTMLParser):
    """The URLs a page loads: scripts, styles, icons."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.loads.append(str(found["src"]))
        if tag == "link" and found.get("href"):
            self.loads.append(str(found["href"]))


@pytest.mark.parametrize("path", ["/schema", "/schema/swagger"])
async def test_the_docs_page_works_offline(start_service, path):
    svc = await start_service()
    page = await svc.client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    here = urlsplit(svc.settings.base_url).netloc
    for url in re.findall(r"""https?://[^\s"'<>)]+""", page.text):
        assert urlsplit(url).netloc == here, f"the page names another host: {url}"
    parser = Page()
    parser.feed(page.text)
    scripts = [u for u in parser.loads if u.endswith(".js")]
    styles = [u for u in parser.loads if u.endswith(".css")]
    assert scripts and styles, parser.loads
    for url in parser.loads:
        target = urljoin(f"{svc.settings.base_url}{path}", url)
        assert urlsplit(target).netloc == here, url
        response = await svc.client.get(target)
        assert response.status_code == 200, url
        assert len(response.content) > (200 if url.endswith("/docs.js") else 1000), url
    kinds = {
        (await svc.client.get(urljoin(svc.settings.base_url, u))).headers["content-type"]
        for u in scripts + styles
    }
    assert kinds == {"text/javascript; charset=utf-8", "text/css; charset=utf-8"}  # once
    assert 'data-document="/schema/openapi.json"' in page.text
    script = await svc.client.get(urljoin(svc.settings.base_url, "/schema/assets/docs.js"))
    assert "SwaggerUIBundle(" in script.text


async def test_only_the_pages_assets_are_served(start_service):
    svc = await start_service()
    for name in ("index.html", "swagger-editor.js", "..%2F__init__.py", "LICENSE"):
        assert (await svc.client.get(f"/schema/assets/{name}")).status_code == 404, name
