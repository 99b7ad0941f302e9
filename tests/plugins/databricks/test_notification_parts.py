"""The parts of `plugins.databricks.notifications`, called directly and in
process (no service, no workspace): `NotifySettings` (defaults, `from_env` and
its checks, the masked repr, `configured`), `_digest` and `_same`, the
`Authorization: Basic` reader `_basic`, the `?token=` / `Bearer` reader
`_token`, `authenticate` (404 when unconfigured, 401 otherwise, which
credentials pass), `run_id`, `read`, `run_keys` and `with_notify_settings`, and
the `Databricks` backend's `run_keys` and `receive_notification`, which hand
over to them. Exact messages and boundaries, so that a changed constant,
comparison or string fails a test; secrets never appear in an error."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgspec
import pytest

from core.errors import NotFound, Unauthorized
from core.models import Notice, NoticeAbout
from core.plugin import Secret
from plugins.databricks import Databricks
from plugins.databricks.notifications import (
    EVENT_TYPES,
    MAX_ID_DIGITS,
    NOT_CONFIGURED,
    NOTIFY_PREFIX,
    REFUSED,
    NotifySettings,
    _basic,
    _digest,
    _same,
    _token,
    authenticate,
    read,
    run_id,
    run_keys,
    with_notify_settings,
)
from plugins.databricks.workspace import DatabricksSettings

USER = "databricks-notifier"
PASSWORD = "pw-5b0c1e0f9d2a4e6f8a7b"
TOKEN = "tok-0f1e2d3c4b5a69788796a5b4"

NOT_CONFIGURED_TEXT = (
    "Databricks notifications are not configured on this service: set"
    " TETHER_DATABRICKS_NOTIFY_USER and TETHER_DATABRICKS_NOTIFY_PASSWORD (the destination's"
    " basic auth), or TETHER_DATABRICKS_NOTIFY_TOKEN (?token= in the destination's URL)"
)
REFUSED_TEXT = (
    "missing or wrong credentials for Databricks notifications: use the destination's basic"
    " auth (TETHER_DATABRICKS_NOTIFY_USER / _PASSWORD) or ?token= (TETHER_DATABRICKS_NOTIFY_TOKEN)"
)
ID_ERROR = "must be a run id (a whole number, or a string of digits), not"


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def basic(user: str, password: str) -> str:
    return f"Basic {b64(f'{user}:{password}')}"


def notice(
    authorization: str | None = None, query: dict[str, list[str]] | None = None, body: Any = None
) -> Notice:
    headers = {} if authorization is None else {"authorization": authorization}
    return Notice(headers=headers, query=query or {}, body=body)


BASIC_ONLY = NotifySettings(notify_user=USER, notify_password=PASSWORD)
TOKEN_ONLY = NotifySettings(notify_token=TOKEN)
BOTH = NotifySettings(notify_user=USER, notify_password=PASSWORD, notify_token=TOKEN)


# ── constants ────────────────────────────────────────────────────────────────


def test_constants_are_as_documented():
    assert NOTIFY_PREFIX == "TETHER_DATABRICKS_"
    assert MAX_ID_DIGITS == 20
    assert NOT_CONFIGURED == NOT_CONFIGURED_TEXT
    assert REFUSED == REFUSED_TEXT
    assert {
        "jobs.on_start",
        "jobs.on_success",
        "jobs.on_failure",
        "jobs.on_duration_warning_threshold_exceeded",
        "jobs.on_streaming_backlog_exceeded",
    } == EVENT_TYPES


# ── NotifySettings ───────────────────────────────────────────────────────────


def test_settings_default_to_empty_and_unconfigured():
    settings = NotifySettings()
    assert (settings.notify_user, settings.notify_password, settings.notify_token) == ("", "", "")
    assert settings.configured is False
    assert NotifySettings.from_env({}) == settings


def test_settings_are_frozen_and_keyword_only():
    with pytest.raises(AttributeError):
        BOTH.notify_token = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        NotifySettings(USER, PASSWORD)  # type: ignore[misc]


def test_settings_configured_by_basic_auth_or_token():
    assert BASIC_ONLY.configured is True
    assert TOKEN_ONLY.configured is True
    assert BOTH.configured is True
    # A password alone (from_env refuses it) configures nothing.
    assert NotifySettings(notify_password=PASSWORD).configured is False
    # a user without a password is no credential (from_env refuses it; built in code, too)
    assert NotifySettings(notify_user="u").configured is False


def test_settings_repr_masks_secrets_but_shows_the_user():
    assert repr(BOTH) == (
        "NotifySettings(notify_user='databricks-notifier', notify_password='***',"
        " notify_token='***')"
    )
    assert repr(NotifySettings()) == (
        "NotifySettings(notify_user='', notify_password='', notify_token='')"
    )
    assert repr(TOKEN_ONLY) == (
        "NotifySettings(notify_user='', notify_password='', notify_token='***')"
    )


def test_from_env_reads_every_notify_variable():
    env = {
        "TETHER_DATABRICKS_NOTIFY_USER": USER,
        "TETHER_DATABRICKS_NOTIFY_PASSWORD": PASSWORD,
        "TETHER_DATABRICKS_NOTIFY_TOKEN": TOKEN,
        "TETHER_DATABRICKS_PROFILE": "ignored",
        "NOTIFY_TOKEN": "not-ours",
    }
    assert NotifySettings.from_env(env) == BOTH
    assert NotifySettings.from_env({"TETHER_DATABRICKS_NOTIFY_TOKEN": TOKEN}) == TOKEN_ONLY


def test_from_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_TOKEN", TOKEN)
    monkeypatch.delenv("TETHER_DATABRICKS_NOTIFY_USER", raising=False)
    monkeypatch.delenv("TETHER_DATABRICKS_NOTIFY_PASSWORD", raising=False)
    assert NotifySettings.from_env() == TOKEN_ONLY


def test_from_env_user_without_password_is_refused():
    with pytest.raises(ValueError) as caught:
        NotifySettings.from_env({"TETHER_DATABRICKS_NOTIFY_USER": USER})
    assert str(caught.value) == (
        "TETHER_DATABRICKS_NOTIFY_USER is set but TETHER_DATABRICKS_NOTIFY_PASSWORD is not:"
        " basic auth for Databricks notifications needs both"
    )


def test_from_env_password_without_user_is_refused_without_showing_it():
    with pytest.raises(ValueError) as caught:
        NotifySettings.from_env(
            {"TETHER_DATABRICKS_NOTIFY_PASSWORD": PASSWORD, "TETHER_DATABRICKS_NOTIFY_TOKEN": TOKEN}
        )
    assert str(caught.value) == (
        "TETHER_DATABRICKS_NOTIFY_PASSWORD is set but TETHER_DATABRICKS_NOTIFY_USER is not:"
        " basic auth for Databricks notifications needs both"
    )
    assert PASSWORD not in str(caught.value) and TOKEN not in str(caught.value)


def test_from_env_empty_user_and_password_count_as_unset():
    env = {"TETHER_DATABRICKS_NOTIFY_USER": "", "TETHER_DATABRICKS_NOTIFY_PASSWORD": ""}
    assert NotifySettings.from_env(env) == NotifySettings()


@pytest.mark.parametrize("user", [":", "a:b", "user:", ":user"])
def test_from_env_user_with_colon_is_refused(user):
    with pytest.raises(ValueError) as caught:
        NotifySettings.from_env(
            {"TETHER_DATABRICKS_NOTIFY_USER": user, "TETHER_DATABRICKS_NOTIFY_PASSWORD": PASSWORD}
        )
    assert str(caught.value) == (
        "invalid setting TETHER_DATABRICKS_NOTIFY_USER: a basic-auth user name has no `:`"
    )
    assert PASSWORD not in str(caught.value)


def test_from_env_password_may_hold_a_colon():
    env = {"TETHER_DATABRICKS_NOTIFY_USER": "u", "TETHER_DATABRICKS_NOTIFY_PASSWORD": "p:q"}
    assert NotifySettings.from_env(env) == NotifySettings(notify_user="u", notify_password="p:q")


# ── _digest and _same ────────────────────────────────────────────────────────


def test_digest_is_sha256_of_utf8():
    assert _digest("") == hashlib.sha256(b"").digest()
    assert _digest("é") == hashlib.sha256(b"\xc3\xa9").digest()
    assert len(_digest(PASSWORD)) == 32


def test_digest_takes_lone_surrogates():
    assert _digest("\ud800") == hashlib.sha256(b"\xed\xa0\x80").digest()


def test_same_compares_whole_strings():
    assert _same(PASSWORD, PASSWORD) is True
    assert _same("", "") is True
    assert _same("", "a") is False
    assert _same("a", "") is False
    assert _same(PASSWORD, PASSWORD + "x") is False
    assert _same(PASSWORD[:-1], PASSWORD) is False
    assert _same("abc", "abd") is False
    assert _same("A", "a") is False


# ── _basic ───────────────────────────────────────────────────────────────────


def test_basic_reads_user_and_password():
    assert _basic(basic(USER, PASSWORD)) == (USER, PASSWORD)


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_basic_scheme_is_case_insensitive(scheme):
    assert _basic(f"{scheme} {b64('u:p')}") == ("u", "p")


def test_basic_tolerates_surrounding_and_inner_spaces():
    assert _basic(f"  Basic   {b64('u:p')}  ") == ("u", "p")


def test_basic_password_keeps_later_colons():
    assert _basic(basic("u", "p:q:r")) == ("u", "p:q:r")
    assert _basic(f"Basic {b64('u:')}") == ("u", "")
    assert _basic(f"Basic {b64(':p')}") == ("", "p")


def test_basic_without_colon_is_a_user_only():
    assert _basic(f"Basic {b64('onlyuser')}") == ("onlyuser", "")


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Basic",
        "Basic ",
        f"Bearer {b64('u:p')}",
        f"Basicx {b64('u:p')}",
        b64("u:p"),
        "Basic not-base64!",
        "Basic dTpw!",  # b64("u:p") with a stray character: read only when validated
        "Basic dTp",  # bad padding
        f"Basic {b64(b'\xff\xfe:p')}",  # not UTF-8
    ],
)
def test_basic_unreadable_header_gives_empty_pair(header):
    assert _basic(header) == ("", "")


# ── _token ───────────────────────────────────────────────────────────────────


def test_token_from_the_query():
    assert _token(notice(query={"token": [TOKEN]})) == TOKEN


def test_token_query_wins_over_bearer():
    n = notice(f"Bearer {TOKEN}-bearer", {"token": [TOKEN]})
    assert _token(n) == TOKEN
    # Even an empty one: the URL said which token it carries.
    assert _token(notice(f"Bearer {TOKEN}", {"token": [""]})) == ""


def test_token_repeated_in_the_query_is_none_even_with_bearer():
    assert _token(notice(query={"token": [TOKEN, TOKEN]})) == ""
    assert _token(notice(f"Bearer {TOKEN}", {"token": [TOKEN, TOKEN]})) == ""


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"  Bearer   {TOKEN}  "]
)
def test_token_from_a_bearer_header(header):
    assert _token(notice(header)) == TOKEN
    assert _token(notice(header, {"token": []})) == TOKEN
    assert _token(notice(header, {"other": ["x"]})) == TOKEN


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearerx {TOKEN}", TOKEN]
)
def test_token_absent_gives_empty(header):
    assert _token(notice(header)) == ""


# ── authenticate ─────────────────────────────────────────────────────────────


def test_authenticate_unconfigured_is_not_found():
    for settings in (NotifySettings(), NotifySettings(notify_password=PASSWORD)):
        with pytest.raises(NotFound) as caught:
            authenticate(settings, notice(basic(USER, PASSWORD), {"token": [TOKEN]}))
        assert caught.value.message == NOT_CONFIGURED_TEXT
        assert caught.value.details == {"backend": "databricks"}
        assert caught.value.code == "not_found"


def test_authenticate_basic_auth_passes():
    assert authenticate(BASIC_ONLY, notice(basic(USER, PASSWORD))) is None
    assert authenticate(BASIC_ONLY, notice(f"basic {b64(f'{USER}:{PASSWORD}')}")) is None


def refused(settings: NotifySettings, n: Notice) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        authenticate(settings, n)
    error = caught.value
    assert error.message == REFUSED_TEXT
    assert error.details is None
    assert error.code == "unauthorized"
    for secret in (PASSWORD, TOKEN, b64(f"{USER}:{PASSWORD}")):
        assert secret not in str(error)
    return error


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        basic(USER, "wrong"),
        basic("someone", PASSWORD),  # the right password alone is not enough
        basic("someone", "wrong"),
        basic(USER, PASSWORD + "x"),
        basic(USER + "x", PASSWORD),
        basic(USER, ""),
        f"Basic {b64(USER)}",
        f"Bearer {PASSWORD}",
        "Basic not-base64!",
    ],
)
def test_authenticate_basic_auth_refuses_anything_else(authorization):
    refused(BASIC_ONLY, notice(authorization))


def test_authenticate_basic_only_ignores_a_token():
    refused(BASIC_ONLY, notice(query={"token": [PASSWORD]}))
    refused(BASIC_ONLY, notice(f"Bearer {PASSWORD}", {"token": [PASSWORD]}))
    # The basic auth passes whatever the query says.
    assert authenticate(BASIC_ONLY, notice(basic(USER, PASSWORD), {"token": ["x"]})) is None


def test_authenticate_token_passes_in_query_or_bearer():
    assert authenticate(TOKEN_ONLY, notice(query={"token": [TOKEN]})) is None
    assert authenticate(TOKEN_ONLY, notice(f"Bearer {TOKEN}")) is None


@pytest.mark.parametrize(
    "n",
    [
        notice(),
        notice(query={"token": ["tok-wrong"]}),
        notice(query={"token": [TOKEN, TOKEN]}),
        notice(query={"token": [TOKEN + "x"]}),
        notice(query={"token": [TOKEN[:-1]]}),
        notice(query={"token": [""]}),
        notice(f"Bearer {TOKEN}", {"token": ["tok-wrong"]}),
        notice(f"Bearer {TOKEN}x"),
        notice(f"Basic {TOKEN}"),
        notice(basic(USER, TOKEN)),
    ],
)
def test_authenticate_token_refuses_anything_else(n):
    refused(TOKEN_ONLY, n)


def test_authenticate_with_both_either_passes():
    assert authenticate(BOTH, notice(basic(USER, PASSWORD))) is None
    assert authenticate(BOTH, notice(query={"token": [TOKEN]})) is None
    assert authenticate(BOTH, notice(f"Bearer {TOKEN}")) is None
    assert authenticate(BOTH, notice(basic(USER, PASSWORD), {"token": ["wrong"]})) is None
    assert authenticate(BOTH, notice(basic(USER, "wrong"), {"token": [TOKEN]})) is None


def test_authenticate_with_both_refuses_when_neither_is_right():
    refused(BOTH, notice())
    refused(BOTH, notice(basic(USER, "wrong"), {"token": ["wrong"]}))
    refused(BOTH, notice(basic("someone", PASSWORD), {"token": [TOKEN + "x"]}))
    refused(BOTH, notice(f"Bearer {PASSWORD}"))


# ── run_id ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (0, "0"),
        (7, "7"),
        (456, "456"),
        (10**19, "1" + "0" * 19),  # 20 digits: the most
        (2**63 - 1, "9223372036854775807"),
        ("456", "456"),
        ("0042", "42"),
        ("0", "0"),
        ("000", "0"),
        (" 42 ", "42"),
        ("\u00a042\u3000", "42"),  # whitespace str.strip takes, even non-ASCII, both ends
        ("9" * 20, "9" * 20),
        ("0" * 30 + "5", "5"),  # the digits counted are the number's
    ],
)
def test_run_id_reads_numbers_and_digit_strings(value, key):
    assert run_id(value, "run.run_id") == key


def test_run_id_refuses_a_negative_number_saying_so():
    with pytest.raises(ValueError) as caught:
        run_id(-1, "run.run_id")
    assert str(caught.value) == "`run.run_id` is negative: not a run id"


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (True, "true or false"),
        (False, "true or false"),
        (1.5, "a number with a fraction or an exponent"),
        (1.0, "a number with a fraction or an exponent"),
        (None, "null"),
        ("", "a string of other characters"),
        ("  ", "a string of other characters"),
        ("12a", "a string of other characters"),
        ("-1", "a string of other characters"),
        ("+1", "a string of other characters"),
        ("1.0", "a string of other characters"),
        ("1 2", "a string of other characters"),
        ("\u0663", "a string of other characters"),  # ARABIC-INDIC DIGIT THREE: a digit, not ASCII
        ("4\u0662", "a string of other characters"),
        ("²", "a string of other characters"),
        ([1], "a list"),
        ({"id": 1}, "an object"),
    ],
)
def test_run_id_refuses_other_values_naming_the_field(value, type_name):
    with pytest.raises(ValueError) as caught:
        run_id(value, "run.parent_run_id")
    assert str(caught.value) == f"`run.parent_run_id` {ID_ERROR} {type_name}"


@pytest.mark.parametrize(
    "value",
    # past Python's own limit on int <-> str conversions (4,300 digits) too
    [10**20, "1" * 21, "9" * 21, 2**64 * 10, "1" * 5000, 10**5000, "0" * 30 + "1" * 21],
    ids=["10**20", "21 ones", "21 nines", "2**64*10", "5000 ones", "10**5000", "zeros first"],
)
def test_run_id_of_more_than_20_digits_is_refused(value):
    with pytest.raises(ValueError) as caught:
        run_id(value, "run.run_id")
    assert str(caught.value) == "`run.run_id` has more than 20 digits: not a run id"


# ── read ─────────────────────────────────────────────────────────────────────


def test_read_a_job_notification():
    body = {
        "event_type": "jobs.on_success",
        "workspace_id": "123",
        "run": {"run_id": "456"},
        "job": {"job_id": "789", "name": "nightly"},
    }
    assert read(body) == NoticeAbout(keys=["456"], kind="jobs.on_success")


def test_read_a_task_notification_names_the_parent_first():
    body = {
        "event_type": "jobs.on_failure",
        "run": {"run_id": 9, "parent_run_id": "42"},
        "task": {"task_key": "ingest"},
    }
    assert read(body) == NoticeAbout(keys=["42", "9"], kind="jobs.on_failure (task ingest)")


def test_read_zero_ids_are_ids():
    body = {"event_type": "jobs.on_start", "run": {"run_id": 0, "parent_run_id": 0}}
    assert read(body) == NoticeAbout(keys=["0", "0"], kind="jobs.on_start")


def test_read_a_null_parent_is_no_parent():
    body = {"event_type": "jobs.on_start", "run": {"run_id": 5, "parent_run_id": None}}
    assert read(body) == NoticeAbout(keys=["5"], kind="jobs.on_start")


def test_read_an_unknown_event_type_is_read_the_same():
    assert read({"event_type": "jobs.on_new_thing", "run": {"run_id": 1}}) == NoticeAbout(
        keys=["1"], kind="jobs.on_new_thing"
    )


@pytest.mark.parametrize("task", [None, "ingest", {"task_key": ""}, {"task_key": 3}, {}, ["t"]])
def test_read_without_a_usable_task_key_shows_the_kind_alone(task):
    body = {"event_type": "jobs.on_start", "run": {"run_id": 1}, "task": task}
    assert read(body).kind == "jobs.on_start"


def test_read_cuts_long_kind_and_task_key_at_100():
    kind = "k" * 99 + "XYZ"
    key = "t" * 99 + "ABC"
    body = {"event_type": kind, "run": {"run_id": 1}, "task": {"task_key": key}}
    assert read(body).kind == "k" * 99 + "X" + " (task " + "t" * 99 + "A)"
    assert read({"event_type": "e" * 100, "run": {"run_id": 1}}).kind == "e" * 100


@pytest.mark.parametrize("body", [None, [1, 2], "jobs.on_success", 1, True])
def test_read_a_body_not_an_object_is_refused(body):
    with pytest.raises(ValueError) as caught:
        read(body)
    assert str(caught.value) == (
        'expected a JSON object such as {"event_type": "jobs.on_success", "run": {"run_id": 123}}'
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"run": {"run_id": 1}},
        {"event_type": "", "run": {"run_id": 1}},
        {"event_type": None, "run": {"run_id": 1}},
        {"event_type": 5, "run": {"run_id": 1}},
        {"event_type": ["jobs.on_start"], "run": {"run_id": 1}},
    ],
)
def test_read_without_event_type_is_refused(body):
    with pytest.raises(ValueError) as caught:
        read(body)
    assert str(caught.value) == "`event_type` is missing (e.g. jobs.on_success)"


@pytest.mark.parametrize(
    "run",
    [None, {}, {"run_id": None}, {"parent_run_id": 1}, [1], "456", 456],
)
def test_read_without_run_id_is_refused(run):
    body = {"event_type": "jobs.on_success", "run": run}
    with pytest.raises(ValueError) as caught:
        read(body)
    assert str(caught.value) == "`run.run_id` is missing (jobs.on_success)"


def test_read_without_run_cuts_the_kind_at_100():
    with pytest.raises(ValueError) as caught:
        read({"event_type": "k" * 99 + "XYZ"})
    assert str(caught.value) == f"`run.run_id` is missing ({'k' * 99}X)"


def test_read_names_the_bad_id_field():
    with pytest.raises(ValueError) as caught:
        read({"event_type": "jobs.on_start", "run": {"run_id": 1, "parent_run_id": True}})
    assert str(caught.value) == f"`run.parent_run_id` {ID_ERROR} true or false"
    with pytest.raises(ValueError) as caught:
        read({"event_type": "jobs.on_start", "run": {"run_id": "12a", "parent_run_id": 1}})
    assert str(caught.value) == f"`run.run_id` {ID_ERROR} a string of other characters"
    with pytest.raises(ValueError) as caught:
        read({"event_type": "jobs.on_start", "run": {"run_id": "1" * 21}})
    assert str(caught.value) == "`run.run_id` has more than 20 digits: not a run id"


# ── run_keys ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("external", "keys"),
    [
        ({"run_id": 42, "run_page_url": "x"}, ["42"]),
        ({"run_id": 0}, ["0"]),
        ({"run_id": 10**19}, ["1" + "0" * 19]),
        ({}, []),
        ({"run_page_url": "x"}, []),
        ({"run_id": None}, []),
        ({"run_id": True}, []),
        ({"run_id": False}, []),
        ({"run_id": "42"}, []),
        ({"run_id": 42.0}, []),
        ({"job_run_id": 42}, []),
    ],
)
def test_run_keys_is_the_integer_run_id(external, keys):
    assert run_keys(external) == keys


# ── with_notify_settings ─────────────────────────────────────────────────────


class Base(msgspec.Struct, kw_only=True):
    host: str = "h"
    port: int = 1


def test_with_notify_settings_adds_the_notify_fields_after_the_base():
    combined = with_notify_settings(Base)
    assert combined.__name__ == "BaseWithNotify"
    fields = [(f.name, f.type, f.default) for f in msgspec.structs.fields(combined)]
    assert fields == [
        ("host", str, "h"),
        ("port", int, 1),
        ("notify_user", str, ""),
        ("notify_password", Secret, ""),  # marked, so masked wherever they stand
        ("notify_token", Secret, ""),
    ]
    assert combined.__struct_config__.frozen is True


def test_with_notify_settings_is_frozen_and_keyword_only():
    combined = with_notify_settings(Base)
    value = combined(notify_token=TOKEN)
    assert (value.host, value.port, value.notify_user, value.notify_token) == ("h", 1, "", TOKEN)
    with pytest.raises(AttributeError):
        value.notify_token = "x"  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        combined("h2")


def test_with_notify_settings_converts_like_the_parts():
    combined = with_notify_settings(Base)
    value = msgspec.convert({"port": "8", "notify_user": "u"}, combined, strict=False)
    assert (value.port, value.notify_user, value.notify_password) == (8, "u", "")
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"notify_user": 5}, combined)


def test_the_backend_declares_its_settings_and_the_notify_ones():
    settings_type = Databricks.settings_type
    assert settings_type.__name__ == "DatabricksSettingsWithNotify"
    assert settings_type.__struct_fields__ == (
        "profile",
        "retry_timeout",
        "http_timeout",
        "threads",
        "notify_user",
        "notify_password",
        "notify_token",
    )
    assert settings_type.__struct_defaults__ == ("", 60, 30.0, 8, "", "", "")
    assert Databricks.settings_prefix == NOTIFY_PREFIX


# ── the backend's methods ────────────────────────────────────────────────────


def backend(notify: NotifySettings | None) -> Databricks:
    return Databricks(DatabricksSettings(threads=1), notify)


BODY = {"event_type": "jobs.on_failure", "run": {"run_id": "9", "parent_run_id": 42}}


async def test_receive_notification_authenticates_then_reads():
    plugin = backend(BASIC_ONLY)
    about = await plugin.receive_notification(notice(basic(USER, PASSWORD), body=BODY))
    assert about == NoticeAbout(keys=["42", "9"], kind="jobs.on_failure")


async def test_receive_notification_refuses_before_reading():
    plugin = backend(TOKEN_ONLY)
    with pytest.raises(Unauthorized) as caught:
        await plugin.receive_notification(notice(basic(USER, PASSWORD), body="not an object"))
    assert caught.value.message == REFUSED_TEXT
    assert await plugin.receive_notification(
        notice(query={"token": [TOKEN]}, body=BODY)
    ) == NoticeAbout(keys=["42", "9"], kind="jobs.on_failure")


async def test_receive_notification_unconfigured_is_not_found(monkeypatch):
    for name in ("USER", "PASSWORD", "TOKEN"):
        monkeypatch.delenv(f"TETHER_DATABRICKS_NOTIFY_{name}", raising=False)
    plugin = backend(None)
    assert plugin.notify == NotifySettings()
    with pytest.raises(NotFound) as caught:
        await plugin.receive_notification(notice(basic(USER, PASSWORD), body=BODY))
    assert caught.value.message == NOT_CONFIGURED_TEXT


async def test_receive_notification_reads_settings_from_env_when_not_given(monkeypatch):
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_TOKEN", TOKEN)
    monkeypatch.delenv("TETHER_DATABRICKS_NOTIFY_USER", raising=False)
    monkeypatch.delenv("TETHER_DATABRICKS_NOTIFY_PASSWORD", raising=False)
    plugin = backend(None)
    assert plugin.notify == TOKEN_ONLY
    about = await plugin.receive_notification(notice(f"Bearer {TOKEN}", body=BODY))
    assert about.keys == ["42", "9"]


def test_given_notify_settings_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_TOKEN", "from-env")
    assert backend(BASIC_ONLY).notify == BASIC_ONLY


def test_backend_run_keys_is_the_run_id():
    plugin = backend(BASIC_ONLY)
    assert plugin.run_keys({"run_id": 77, "run_page_url": "x"}) == ["77"]
    assert plugin.run_keys({"run_id": "77"}) == []
