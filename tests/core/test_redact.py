"""`core.redact`: every form of a secret a text may quote is masked, and what
a cut left of one: a piece of it anywhere, a beginning at the end of a cut
text, an ending at its start; nothing else is."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from core.redact import (
    FRAGMENT,
    MASK,
    MIN_CUT,
    forms,
    redact,
    redact_bytes,
    redact_value,
)

TOKEN = "nbcaslPdf-OnkSfhnYAW6By053zklYzE3nJtVHfvVBY"
BEARER = "Bearer s3cr3t/t0k+en="
BASIC = "Basic " + base64.b64encode(b"hookuser:s3cr3tpw").decode()


def test_a_plain_secret_has_one_form():
    assert forms(TOKEN) == [TOKEN]
    assert forms("a.b_c~d-e") == ["a.b_c~d-e"]


def test_an_authorization_value_is_known_whole_escaped_encoded_and_alone():
    found = forms(BEARER)
    for form in (
        BEARER,
        "s3cr3t/t0k+en=",
        "Bearer s3cr3t\\/t0k+en=",
        "s3cr3t\\/t0k+en=",
        quote(BEARER, safe=""),
        "s3cr3t%2Ft0k%2Ben%3D",
    ):
        assert form in found, form
    assert found == sorted(found, key=len, reverse=True)  # the longest is masked first
    assert "Bearer" not in found  # the scheme alone is no secret


def test_a_basic_credential_is_known_decoded_and_its_password_alone():
    found = forms(BASIC)
    assert "hookuser:s3cr3tpw" in found and "s3cr3tpw" in found
    assert "hookuser" not in found  # the user is no secret
    assert "pw" not in forms("Basic " + base64.b64encode(b"u:pw").decode())  # too short alone
    assert forms("Basic not-base64!") == sorted(
        {
            "Basic not-base64!",
            "not-base64!",
            quote("Basic not-base64!", safe=""),
            quote_plus("Basic not-base64!"),  # a form's encoding: `+` for the space
            quote("not-base64!", safe=""),
        },
        key=len,
        reverse=True,
    )


def test_a_credential_is_what_follows_the_scheme_spaces_and_colons_included():
    assert "abc def" in forms("Token abc def")
    two = "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert "pa:ss" in forms(two) and "ss" not in forms(two)
    four = "Basic " + base64.b64encode(b"u:four").decode()
    assert "four" in forms(four)  # a password of MIN_CUT characters is masked alone
    broken = "Basic aG9v*a3VzZXI6czNjcjN0cHc="  # one character that is not base64
    assert not any("hookuser" in form for form in forms(broken))


def test_a_non_ascii_secret_is_known_as_json_escapes_it():
    assert json.dumps("t0k\u00e9n")[1:-1] in forms("Bearer t0k\u00e9n")


def test_redact_masks_each_form_wherever_it_is():
    text = f"got {BEARER!r}, then {json.dumps(BEARER)} and s3cr3t%2Ft0k%2Ben%3D at last"
    assert redact(text, [BEARER]) == f"got '{MASK}', then \"{MASK}\" and {MASK} at last"
    assert redact("nothing here", [BEARER, ""]) == "nothing here"
    assert redact(f"an empty secret first, then {TOKEN}", ["", TOKEN]) == (
        f"an empty secret first, then {MASK}"
    )


@pytest.mark.parametrize("kept", range(1, len(TOKEN)))
def test_a_secret_cut_at_the_end_loses_its_beginning_from_four_characters(kept: int):
    text = "refused: http://t/callbacks/j%3A1?token=" + TOKEN[:kept]
    said = redact(text, [TOKEN])
    if kept >= MIN_CUT:
        assert said == "refused: http://t/callbacks/j%3A1?token=" + MASK
    else:
        assert said == text  # three characters tell next to nothing of it


def test_a_short_beginning_anywhere_but_the_end_is_left():
    text = f"{TOKEN[: FRAGMENT - 1]} is not a cut"
    assert redact(text, [TOKEN]) == text


@pytest.mark.parametrize("kept", range(1, len(TOKEN)))
def test_a_secret_cut_at_the_start_loses_its_ending_from_four_characters(kept: int):
    """A text cut from the front (a log's last lines, a trace's tail)."""
    text = TOKEN[-kept:] + " HTTP/1.1 500"
    said = redact(text, [TOKEN])
    if kept >= MIN_CUT:
        assert said == MASK + " HTTP/1.1 500"
    else:
        assert said == text


@pytest.mark.parametrize("size", range(FRAGMENT, len(TOKEN)))
@pytest.mark.parametrize("at", [0, 9, "end"])
def test_a_piece_of_a_secret_anywhere_is_masked_from_eight_characters(size: int, at: Any):
    """Cut from the front and left in the middle of a text (a log's tail
    quoted in an error: found in an audit, 2026-12-04), or from both sides."""
    start = len(TOKEN) - size if at == "end" else min(at, len(TOKEN) - size)
    piece = TOKEN[start : start + size]
    text = f"last log lines: {piece}\nexit 1"
    assert redact(text, [TOKEN]) == f"last log lines: {MASK}\nexit 1"
    assert redact_value({"error": {"message": text}}, [TOKEN]) == {
        "error": {"message": f"last log lines: {MASK}\nexit 1"}
    }


def test_pieces_of_a_secret_that_overlap_or_repeat_are_masked_as_one_each():
    a, b = TOKEN[:20], TOKEN[10:30]
    assert redact(f"{a}|{b}|{a}|{a}", [TOKEN]) == f"{MASK}|{MASK}|{MASK}|{MASK}"
    assert redact(f"{a}{a}", [TOKEN]) == f"{MASK}{MASK}"
    assert redact(f"x{TOKEN[5:25]}{TOKEN[30:]}y", [TOKEN]) == f"x{MASK}{MASK}y"
    assert redact(f"{TOKEN[3:12]}", [TOKEN]) == MASK


@pytest.mark.parametrize("kept", range(MIN_CUT, FRAGMENT))
def test_a_short_ending_at_the_start_is_masked_in_json_too(kept: int):
    """`redact_value` walks a value only when its JSON holds what `redact`
    masks: a short ending, at a string's start, too."""
    value = {"log": f"{TOKEN[-kept:]} refused"}
    assert redact_value(value, [TOKEN]) == {"log": f"{MASK} refused"}


def test_an_ending_after_a_cut_mark_is_masked_too():
    for mark in ("…", "..."):
        text = f"(cut){mark}{TOKEN[-5:]} was refused"
        assert redact(text, [TOKEN]) == f"(cut){mark}{MASK} was refused"


def test_redact_value_walks_json_and_leaves_what_holds_no_secret_as_it_is():
    value = {"a": [f"x {TOKEN} y", {TOKEN: 1, "n": 2.5}], "b": None, "c": TOKEN[:20]}
    assert redact_value(value, [TOKEN]) == {
        "a": [f"x {MASK} y", {MASK: 1, "n": 2.5}],
        "b": None,
        "c": MASK,
    }
    clean = {"a": ["x", {"y": 1}]}
    assert redact_value(clean, [TOKEN]) is clean
    assert redact_value(value, []) is value
    assert redact_value(TOKEN, [TOKEN]) == MASK


def test_redact_bytes_masks_every_form_in_a_body_not_yet_read():
    body = json.dumps({"got": BEARER, "alone": "s3cr3t/t0k+en="}).encode()
    assert redact_bytes(body, [BEARER]) == b'{"got": "***", "alone": "***"}'
    assert redact_bytes(b"hookuser:s3cr3tpw", [BASIC]) == b"***"
    assert redact_bytes(b"plain", [BEARER]) == b"plain"
    assert redact_bytes(TOKEN.encode(), [""]) == TOKEN.encode()


def test_a_cut_before_a_cut_mark_is_masked_too():
    """A plugin that cuts a long text marks the cut (`…`) and may add more after."""
    for mark in ("…", "..."):
        text = f"for url: http://t/callbacks/j%3A1?token={TOKEN[:20]}{mark} (and more)"
        assert (
            redact(text, [TOKEN])
            == f"for url: http://t/callbacks/j%3A1?token={MASK}{mark} (and more)"
        )


def test_only_a_secret_word_is_masked_where_cut_not_a_scheme_or_a_user_name():
    assert redact("we saw a Polar Bear", [BEARER]) == "we saw a Polar Bear"
    assert redact("denied for user hookuser", [BASIC]) == "denied for user hookuser"
    assert redact("cut at s3cr3t/t0", [BEARER]) == f"cut at {MASK}"  # the credentials, cut
    assert redact("the password s3cr3t", [BASIC]) == f"the password {MASK}"  # the password, cut


def test_a_secret_of_one_word_with_escapable_characters_is_masked_where_cut():
    secret = "s3cr3t/t0k+en="  # no scheme: the whole of it is the credential
    assert redact("cut at s3cr3t/t0", [secret]) == f"cut at {MASK}"
    assert redact("cut at s3cr3t%2Ft0", [secret]) == f"cut at {MASK}"


def test_a_short_secret_cut_by_one_character_is_masked():
    """Shorter than `FRAGMENT`: the cut rules alone find what is left."""
    assert redact("refused: s3cr3tp", ["s3cr3tpw"]) == f"refused: {MASK}"
    assert redact("3cr3tpw was refused", ["s3cr3tpw"]) == f"{MASK} was refused"


def test_a_piece_of_a_secret_of_one_repeated_character_is_masked_whole():
    assert redact("x" + "a" * 9 + "x", ["b" + "a" * 10 + "b"]) == f"x{MASK}x"


def test_a_backend_errors_message_set_later_is_the_one_its_text_shows():
    """`str()` and a traceback show `args`: a message masked by setting it
    again kept the unmasked text there (found by a review)."""
    from core.errors import BackendError

    error = BackendError("GET ?token=s3cret answered 500", code=500)  # type: ignore[arg-type]
    error.message = "GET ?token=*** answered 500"
    assert str(error) == error.message and error.args == (error.message,)
    assert "s3cret" not in repr(error)
    assert BackendError(None).args == ("the backend gave no message",)  # type: ignore[arg-type]


def test_a_backend_errors_message_holds_no_secret_of_the_environment(monkeypatch):
    """A `BackendError`'s message is filed in events and logged as it is: a
    workspace quoting the Databricks token percent-encoded left it whole
    there (found by a QA pass, 2026-12-07). Every plugin's, given or set."""
    import core.redact
    from core.errors import BackendError

    monkeypatch.setattr(core.redact, "_ENVIRONMENT", ("Zk9/q+Xw=Lm2Rt8sVb4",))
    error = BackendError("bad credential Zk9%2Fq%2BXw%3DLm2Rt8sVb4", retryable=True)
    assert error.message == f"bad credential {MASK}" and error.args == (error.message,)
    error.message = "again: Zk9/q+Xw=Lm2Rt8sVb4"
    assert str(error) == f"again: {MASK}"
    assert BackendError(ValueError("Zk9\\/q+Xw=Lm2Rt8sVb4")).message == MASK  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("secret", "echo"),
    [
        ("pass&word<long>", "pass\\u0026word\\u003clong\\u003e"),  # Go's encoding/json
        ('p\u00e4ss"word-long', 'p\u00e4ss\\"word-long'),  # JavaScript's, msgspec's: UTF-8
        ("pass/word-long!", "pass\\/word-long%21"),  # PHP's \/ of a path's encoding
    ],
)
def test_a_secret_of_the_environment_is_masked_as_json_encoders_write_it(
    monkeypatch, secret: str, echo: str
):
    """Forms a review (2026-12-07) found kept whole in a backend's error."""
    import core.redact
    from core.errors import BackendError

    monkeypatch.setattr(core.redact, "_ENVIRONMENT", (secret,))
    assert BackendError(f"the server said: {echo}").message == f"the server said: {MASK}"
    assert core.redact.value_without_environment_secrets({"echo": echo}) == {"echo": MASK}


def test_the_secrets_of_the_environment_are_those_declared_or_named_as_secrets():
    """What tracebacks and what a run reports are cleaned of: Tether's own
    secrets (each of a list), `http_webhook`'s credentials in their forms,
    and variables whose names end as a secret's. A name that merely holds
    such a word is no secret (a review, 2026-12-07: `GIT_AUTHOR_NAME`,
    `DATABRICKS_AUTH_TYPE`, `SORT_KEY` were masked in job results)."""
    from core.redact import environment_secrets

    env = {
        "TETHER_API_TOKEN": "first-token-111,second-token-222",
        "TETHER_WEBHOOK_AUTH_RUNNER": "Bearer runner-cred-1",
        "TETHER_ACME_PASSWORD": "/starts-with-a-slash",  # base64 may
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
        "TETHER_WRONG_TOKENS_PER_MINUTE": "30000000",
        "GIT_AUTHOR_NAME": "Jonathan Smith",
        "DATABRICKS_AUTH_TYPE": "azure-cli-auth",
        "SORT_KEY": "created_at_key",
        "KEY_COLUMNS": "customer_id,order_id",
        "PRIVATE_REGISTRY": "registry.example.com",
        "SHORT_TOKEN": "short",
    }
    found = set(environment_secrets(env))
    assert {
        "first-token-111",
        "second-token-222",
        "Bearer runner-cred-1",
        "runner-cred-1",  # what a receiver parses out of the header
        "/starts-with-a-slash",
        "aws-secret-value",
    } <= found
    for value in ("30000000", "Jonathan Smith", "azure-cli-auth", "created_at_key", "short"):
        assert value not in found
    assert not any("customer_id" in f or "registry" in f for f in found)


def test_a_results_keys_are_masked_and_kept_apart(monkeypatch):
    """A secret as a key was kept whole in the job (a QA pass, 2026-12-07);
    masked, two keys alike became one, a value lost (a review, the day
    before): each masked key that meets one before it is numbered. A
    callback token as a key too. A tuple's strings are masked as a list's."""
    import core.redact

    monkeypatch.setattr(core.redact, "_ENVIRONMENT", ("Bearer runner-cred-1", "runner-cred-1"))
    value = {
        "runner-cred-1": 1,
        "Bearer runner-cred-1": 2,
        "***": 3,
        "seen": "runner-cred-1",
        "args": ("Bearer runner-cred-1",),
        "nested": {"runner-cred-1": {"runner-cred-1": "runner-cred-1"}},
        "cb-token-0123456789": 4,
        "cb-token-0123456789 ": 5,
    }
    assert redact_value(value, ["cb-token-0123456789"]) == {
        "***": 1,
        "*** (2)": 2,
        "*** (3)": 3,
        "seen": "***",
        "args": ["***"],
        "nested": {"***": {"***": "***"}},
        "*** (2) (2)": 4,  # numbered by each of the two masks in turn
        "*** ": 5,
    }
    assert redact_value({"plain": "text"}, []) == {"plain": "text"}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "GET https://u:pw@h.example/x?api_key=k1&b=2",
            "GET https://***@h.example/x?api_key=***&b=***",
        ),
        ("HTTPS://U:P@ss@h.example/x", "HTTPS://***@h.example/x"),  # to the last @, any case
        ("mail a@b.example, or see http://h/y@z", "mail a@b.example, or see http://h/y@z"),
    ],
)
def test_a_urls_credentials_and_query_are_masked_in_a_libraries_words(text: str, shown: str):
    from core.redact import unquoted

    assert unquoted(text) == shown


def test_the_url_masks_read_each_position_a_bounded_number_of_times():
    """From every word boundary, as they were, `a.a.a.…` took seconds for
    40 KB (found by a review, 2026-12-06); so did a run of `x://` for the
    query's. 200 KB of each here: minutes before, milliseconds now."""
    import time

    from core.redact import unquoted

    for text in ("a." * 100_000, "x://" * 50_000, "http://h/" + "a/" * 100_000):
        started = time.process_time()
        assert unquoted(text) == text
        assert time.process_time() - started < 2.0, text[:20]


def test_a_percent_encoding_in_lowercase_is_masked_too():
    """`%c3%b6` is as common as `%C3%B6` (a review, 2026-12-07, found a
    non-ASCII credential so encoded kept whole)."""
    secret = "Bearer t\u00f6k/en-s3cr3t"
    lower = "t%c3%b6k%2fen-s3cr3t"
    assert lower in forms(secret) and "t%C3%B6k%2Fen-s3cr3t" in forms(secret)
    assert redact(f"got {lower} back", [secret]) == f"got {MASK} back"
    assert redact_bytes(f"got {lower}".encode(), [secret]) == f"got {MASK}".encode()
    mixed = "t%C3%B6k%2fen-s3cr3t"  # one piece, two forms: masked as one
    assert redact(f"cut at {mixed[:-3]}", [secret]) == f"cut at {MASK}"


def test_a_secret_of_the_environment_percent_encoded_in_lowercase_is_masked(monkeypatch):
    import core.redact

    monkeypatch.setattr(core.redact, "_ENVIRONMENT", ("p\u00e4ssw\u00f6rd-of-acme",))
    lower = "p%c3%a4ssw%c3%b6rd-of-acme"
    assert core.redact.without_environment_secrets(f"echo {lower}") == f"echo {MASK}"
    assert core.redact.value_without_environment_secrets({"echo": lower}) == {"echo": MASK}


@pytest.mark.parametrize(
    "echo",
    [
        quote_plus("p\u00e4ss/w rd+of-acme"),  # what `urlencode` writes
        quote("p\u00e4ss/w rd+of-acme"),  # `/` kept, as a path's
        quote("p\u00e4ss/w rd+of-acme").lower(),
        json.dumps("p\u00e4ss/w rd+of-acme")[1:-1],  # `\u00e4`
    ],
)
def test_a_secret_of_the_environment_is_masked_as_encoders_write_it(monkeypatch, echo: str):
    """A review, 2026-12-07, found these forms of a secret of the
    environment kept whole, in a text and in what a run reports."""
    import core.redact

    monkeypatch.setattr(core.redact, "_ENVIRONMENT", ("p\u00e4ss/w rd+of-acme",))
    assert core.redact.without_environment_secrets(f"echo {echo}!") == f"echo {MASK}!"
    assert core.redact.value_without_environment_secrets({"echo": echo}) == {"echo": MASK}


@pytest.mark.parametrize(
    "echo",
    [
        "".join(f"\\u{ord(c):04x}" for c in "s3cr3t/t0k+en="),  # wholly in escapes
        json.dumps("t\u00f6k\\en-s3cr3t", ensure_ascii=False)[1:-1],  # msgspec's mix
    ],
)
def test_a_secret_written_in_json_escapes_is_masked_in_its_reading(echo: str):
    r"""What masks in the reading masks the escapes it was read from; the
    rest of the text is as it was, escapes and all."""
    secret = "Bearer t\u00f6k\\en-s3cr3t" if "\u00f6" in echo else BEARER
    text = f'{{"error": "bad credential {echo}", "hint": "line\\nbreak"}}'
    shown = redact(text, [secret])
    assert shown == '{"error": "bad credential ***", "hint": "line\\nbreak"}'


def test_a_json_escape_a_cut_left_unfinished_hides_no_head():
    r"""A non-ASCII credential in `json.dumps`'s escapes, cut inside one (at
    the end, or before a cut mark): its head is masked in both readings
    (a QA pass, 2026-12-07: `\u00fc\u00e9…fhd` then `\u00` kept 7
    characters of it)."""
    secret = "Bearer \u00fc\u00e9\u00fc\u00e9fhd\u00fc\u00f6e\u00fc\u00fc"
    text = "got " + json.dumps(secret.partition(" ")[2])[:32]
    assert text.endswith("fhd\\u00")
    assert redact(text, [secret]) == 'got "***'
    assert redact(text + "\u2026 more", [secret]) == 'got "***\u2026 more'
    escaped = "".join(f"\\u{ord(c):04x}" for c in TOKEN)[: 6 * 7 + 3]  # 7 and a part
    assert redact(f"?token={escaped}", [TOKEN]) == f"?token={MASK}"
    assert redact(f"?token={escaped}...", [TOKEN]) == f"?token={MASK}..."


def test_a_secret_in_json_in_json_is_masked_whole_whatever_it_holds():
    r"""Two readings (`READINGS`), and the masks of every form and reading
    put in at once: a credential holding `\f` lost its own windows to
    its unescaped variant's masks (a QA pass, 2026-12-07)."""
    for credential in ("k6Gmw_x=h\\ffuC~6", "s3cr3tA\\bcdefgh-k3y", "t\u00f6k/en+s3cr3t"):
        for ascii_only in (True, False):
            twice = json.dumps(json.dumps(credential, ensure_ascii=ascii_only))[1:-1]
            shown = redact(f"got {twice} back", [f"Bearer {credential}"])
            assert shown == f'got \\"{MASK}\\" back', (credential, shown)
    escaped = "".join(f"\\u{ord(c):04x}" for c in TOKEN)
    assert redact(json.dumps(f"url ?token={escaped}"), [TOKEN]) == '"url ?token=***"'


def test_a_value_with_a_token_in_json_escapes_is_walked_and_masked():
    r"""`redact_value` looked only for a form's pieces in the value's JSON,
    so a string holding the token in `\u` escapes was never walked (a QA
    pass, 2026-12-07: kept in a receipt)."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in TOKEN)
    value = {"echo": f'{{"url": "?token={escaped}"}}', "n": 1}
    assert redact_value(value, [TOKEN]) == {"echo": '{"url": "?token=***"}', "n": 1}
    plain = {"path": "C:\\tmp\\new", "n": 1}
    assert redact_value(plain, [TOKEN]) == plain


def test_a_text_whose_escapes_hold_no_secret_comes_back_as_it_was():
    text = '{"error": "t\\u00f6ken \\"expired\\"", "path": "a\\/b"}'
    assert redact(text, [BEARER, TOKEN]) == text
    assert redact(f"{text} {BEARER}", [BEARER]) == f"{text} {MASK}"


def test_a_secret_that_holds_an_escape_is_masked_in_either_reading():
    """A secret with a literal `\\u0041` in it, echoed raw beside another
    secret in escapes: the reading masks both."""
    odd = "odd\\u0041-secret-value"
    escaped = "".join(f"\\u{ord(c):04x}" for c in TOKEN)
    shown = redact(f"raw {odd} and {escaped}", [odd, TOKEN])
    assert shown == f"raw {MASK} and {MASK}"
    assert "oddA" not in shown


def test_a_text_with_a_lone_surrogate_and_an_escape_is_read_without_error():
    """A plugin's message may hold a lone surrogate (a file name decoded
    with `surrogateescape`): the reading's first look encoded the text and
    raised, and the trigger step's log line with it (a QA pass, 2026-12-07)."""
    text = "no file caf\udce9 under C:\\tmp"
    assert redact(text, [TOKEN]) == text
    escaped = "".join(f"\\u{ord(c):04x}" for c in TOKEN)
    assert redact(f"caf\udce9 {escaped}", [TOKEN]) == f"caf\udce9 {MASK}"


def test_an_escaped_backslash_after_a_secret_is_kept():
    """In the second reading an escaped backslash reads as a lone one: it
    is not an escape left unfinished, and stays (a QA pass, 2026-12-07)."""
    for after in ("\\\\", "\\u005c", "\\\\\u2026"):
        assert redact(f"path {TOKEN}{after}", [TOKEN]) == f"path {MASK}{after}"


def test_a_tokens_readings_are_made_only_where_an_escape_could_hide_it():
    """A callback token's characters are read from no short escape: a text
    with only those is not read (a megabyte of them cost 0.5 s), and one
    with a `\\u` escape, or an odd backslash at a cut, still is."""
    from core.redact import _may_hide

    assert not _may_hide(TOKEN[:4] + "\\n\\\\" * 1000, [TOKEN])
    assert _may_hide("x \\u0041", [TOKEN]) and _may_hide("a\\", [TOKEN])
    assert _may_hide("a\\\\\\\u2026", [TOKEN]) and not _may_hide("a\\\\\u2026", [TOKEN])
    assert _may_hide("plain\\n", [BEARER])  # `/` reads from `\/`: always read
    assert redact(f"cut {TOKEN[:7]}\\", [TOKEN]) == f"cut {MASK}"


def _unfinished_by_hand(text: str) -> bool:
    """An odd run of backslashes right before a cut mark or the end."""
    for end in range(len(text) + 1):
        if end < len(text) and not text.startswith(("…", "..."), end):
            continue
        run = len(text[:end]) - len(text[:end].rstrip("\\"))
        if run % 2:
            return True
    return False


def test_an_unfinished_escape_is_found_as_by_hand():
    """`UNFINISHED_BARE`, written to search fast (a megabyte without a
    backslash took 13 ms, of which the look behind was the most), finds
    what its definition says, on every short text of these characters."""
    import itertools

    from core.redact import UNFINISHED_BARE

    for size in range(8):
        for chars in itertools.product("\\a….", repeat=size):
            text = "".join(chars)
            assert bool(UNFINISHED_BARE.search(text)) == _unfinished_by_hand(text), text


def test_a_text_with_none_of_the_pieces_looked_for_has_nothing_to_mask():
    """`redact` returns a text without a backslash at once when none of the
    pieces `_mentions` looks for is in it (`_said`): the usual case, a
    microsecond where `_spans` took 25 for each string of a value (a value
    of many small strings held the loop for a second, a review,
    2026-12-07). So no text without them may have a span: texts made of
    random slices of every form of several secrets, cut marks and other
    characters."""
    import random

    from core.redact import _forms, _said, _spans

    secrets = [TOKEN, BEARER, BASIC, "Bearer pässwörd-ünïcode/ok", "short1"]
    parts = [f for s in secrets for f in (_forms(s)[0] + _forms(s)[1])]
    rng = random.Random(7)
    seen = 0
    for _ in range(20000):
        bits = []
        for _ in range(rng.randint(1, 4)):
            form = rng.choice(parts)
            a = rng.randrange(len(form))
            bits.append(form[a : a + rng.randint(1, 12)])
            bits.append(rng.choice(["", " ", "…", "...", "x", "%", "\u00e4"]))
        text = "".join(bits).replace("\\", "")
        if not _said(text, secrets):
            seen += 1
            assert _spans(text, secrets) == [], text
            assert redact(text, secrets) == text
    assert seen > 1000  # (the look is not always true)
