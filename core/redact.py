"""Secrets out of what Tether keeps and shows: a text from outside (a
receiver's answer, a run's state message, an error) may quote a secret Tether
sent, in more forms than the one it sent.

`redact` masks each form `forms` knows, and what a cut left of a secret's
one-word forms: any piece of at least `FRAGMENT` characters wherever it is
(a log's tail that begins inside a URL), and a shorter beginning left at the
text's end or an ending at its start (an error cut to its limit before it
got here, from either side). The
secrets are the callback tokens a job's URLs carry (`CallbackSigner.tokens`)
and the `Authorization` values backends send (http_webhook's credentials).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from traceback import format_exception
from typing import Any
from urllib.parse import quote, quote_plus

import msgspec

MASK = "***"
MIN_CUT = 4
"""The fewest characters of a secret's beginning, at the end of a text (or its
ending, at the start), that are masked as a cut secret: fewer tell next to
nothing of it, and would mask ordinary text that happens to end like one."""

FRAGMENT = 8
"""The fewest characters of a secret's one-word form masked wherever they
stand: 8 characters of a callback token are 48 bits of it, which no
ordinary text holds by chance."""


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+")
"""Characters neither JSON nor percent-encoding change."""


def forms(secret: str) -> list[str]:
    """The ways a text may quote `secret`, longest first: as it is; escaped as
    JSON writes it (also with `/` as `\\/`, as PHP's json_encode does);
    percent-encoded; and for an `Authorization` value, its credentials alone
    (what follows the scheme) and for `Basic` their decoded `user:password`
    and the password."""
    return _forms(secret)[0]


def _forms(secret: str) -> tuple[list[str], list[str]]:
    """`forms`, and those of them whose beginning alone is worth masking where
    a text was cut (`cut_forms`): the secret itself when it is one word, the
    credentials and the password; not a form that begins with a scheme
    (`Bearer …`) or a user name (`user:password`), whose first characters
    are ordinary words."""
    if _PLAIN.fullmatch(secret):  # a callback token: no other form
        return [secret], [secret]
    found, cut = {secret}, set() if " " in secret.strip() else {secret}
    scheme, _, credentials = secret.partition(" ")
    credentials = credentials.strip()
    if credentials:
        found.add(credentials)
        cut.add(credentials)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            if decoded:
                found.add(decoded)
                password = decoded.partition(":")[2]
                if len(password) >= MIN_CUT:
                    found.add(password)
                    cut.add(password)
    for group in (found, cut):
        for form in list(group):
            escaped = json.dumps(form)[1:-1]
            group.update((escaped, escaped.replace("/", "\\/"), *_percent_encoded(form)))
    return _longest_first(found), _longest_first(cut)


_HEX_ESCAPE = re.compile(r"%[0-9A-F]{2}")


@functools.cache
def _percent_encoded(form: str) -> tuple[str, ...]:
    """`form` percent-encoded as encoders write it: every character but the
    unreserved ones (`quote`), or `/` kept (a path's), or a space as `+` (a
    form's, `urlencode`); each with the hex digits in uppercase (`%C3%B6`)
    and in lowercase (`%c3%b6`). Longest first. (A review, 2026-12-07,
    found a non-ASCII credential in lowercase, and an environment's secret
    in a form's encoding, kept whole.)"""
    encoded = {quote(form, safe=""), quote(form, safe="/"), quote_plus(form, safe="")}
    encoded |= {_HEX_ESCAPE.sub(lambda escape: escape.group(0).lower(), e) for e in encoded}
    return tuple(sorted(encoded, key=len, reverse=True))


def _longest_first(found: set[str]) -> list[str]:
    return sorted((f for f in found if f), key=len, reverse=True)


CUT_MARKS = ("…", "...")
"""What a text cut short may end with (`plugins.databricks.runs`' `…`)."""


def redact(text: str, secrets: Iterable[str]) -> str:
    r"""`text` with every form of each of `secrets` masked, and what a cut left
    of a secret's one-word form: any piece of it of `FRAGMENT` characters or
    more, wherever it is; a shorter beginning (from `MIN_CUT` characters)
    at the text's end or before a cut mark (`CUT_MARKS`); a shorter ending
    at its start or after a cut mark.

    The text is also read with JSON's escapes undone, twice (JSON in JSON:
    `READINGS`), and what masks there masks the escapes it was read from: a
    secret written wholly in `\uXXXX` escapes, or as a mix no encoder's
    form is (msgspec's `t\u00f6k\\en`, non-ASCII as it is and `\` escaped),
    which a plugin's message kept (a QA pass, 2026-12-07). All masks are
    found first and put in at once (`_spans`), so one form's mask never
    breaks another's; the text comes back as it was but for them."""
    secrets = [secret for secret in secrets if secret]
    if not secrets or ("\\" not in text and not _said(text, secrets)):
        return text  # (the usual case, found in a microsecond where `_spans` takes 25)
    spans = _spans(text, secrets)
    # a secret that itself holds an escape (`a\u0041`) is read so too
    read = secrets + [unescaped(secret) for secret in secrets if "\\" in secret]
    if "\\" in text and _may_hide(text, read):
        reading, places = text, list[_Places]()
        for level in range(READINGS):
            if "\\" not in reading:
                break
            reading, where = _read_escapes(reading, cut_bare=level == 0)
            places.insert(0, where)
            if not _mentions(reading.encode("utf-8", "surrogatepass"), read):
                continue  # (a look far cheaper than `_spans`)
            for a, b in _spans(reading, read):
                if b > a:
                    start, last = a, b - 1
                    for where in places:  # back to the text, a reading at a time
                        start, last = where.start(start), where.end(last) - 1
                    spans.append((start, last + 1))
    return _masked(text, spans)


UNFINISHED_BARE = re.compile(r"\\(?<!\\\\)(?:\\\\)*+(?=…|\.\.\.|\Z)")
"""An odd run of backslashes at a text's end or before a cut mark: its last
one is an escape a cut left unfinished. (Written to begin with the
backslash, not with the look behind it, so that the search skips to each
backslash, and possessive, so that an even run is given up at once: on a
megabyte without one, 0.3 ms where the look first took 13 ms; of escaped
backslashes, 27 ms where it took 60.)"""


def _may_hide(text: str, secrets: Sequence[str]) -> bool:
    """Whether `text`'s escapes may hide one of `secrets`: a secret of
    unreserved characters only (a callback token) can stand in a reading
    only where a `\\u` escape or an unfinished escape stands, since JSON's
    short escapes read as none of those characters. (A megabyte of `\\n`
    or of escaped backslashes that began with a token's first characters
    was read twice for nothing: 0.5-0.65 s, a review, 2026-12-07.)"""
    if "\\u" in text or UNFINISHED_BARE.search(text):
        return True
    return not all(_PLAIN.fullmatch(secret) for secret in secrets)


READINGS = 2
"""How many times a text's JSON escapes are undone: a secret in JSON that was
written in JSON again (a receiver's error quoting a request's body)."""


def _spans(text: str, secrets: Sequence[str]) -> list[tuple[int, int]]:
    """Where `redact` masks `text`, as `[start, end)` places, overlapping.
    The whole forms are found first, and blanked (`BLANK`, one for each of
    their characters, so every place stays where it is) in the text the
    cuts and pieces are looked for in: none is looked for inside a whole
    secret, as a mask put in at once would have it (a text made of one
    token repeated has a place for each of its windows in each)."""
    formed = [_forms(secret) for secret in secrets]
    spans: list[tuple[int, int]] = []
    for whole, _ in formed:
        for form in whole:
            if form in text:
                spans += ((at, at + len(form)) for at in _places(text, form))
                text = text.replace(form, BLANK * len(form))
    for _, cuttable in formed:
        spans += _pieces(text, cuttable)
        for form in cuttable:
            for size in range(min(len(form) - 1, FRAGMENT - 1), MIN_CUT - 1, -1):
                head, tail = form[:size], form[-size:]
                if text.endswith(head):
                    spans.append((len(text) - size, len(text)))
                if text.startswith(tail):
                    spans.append((0, size))
                for mark in CUT_MARKS:
                    spans += ((at, at + size) for at in _places(text, head + mark))
                    after = len(mark)
                    spans += ((at + after, at + after + size) for at in _places(text, mark + tail))
    return spans


BLANK = "\x00"
"""What stands for a whole secret's characters while `_spans` looks for cuts
and pieces of others."""


def _places(text: str, part: str) -> list[int]:
    """Where `part` begins in `text`, overlapping places too."""
    found, at = [], text.find(part)
    while at != -1:
        found.append(at)
        at = text.find(part, at + 1)
    return found


def _pieces(text: str, cuttable: Sequence[str]) -> list[tuple[int, int]]:
    """The places in `text` of each piece of a form in `cuttable` of at least
    `FRAGMENT` characters: those of each of their `FRAGMENT`-character
    windows, which `_masked` joins where they overlap (also those of two
    forms: a piece written partly as `%2F` and partly as `%2f` is one).
    Each distinct window is looked for once (a secret of one repeated
    character has one)."""
    windows = {form[k : k + FRAGMENT] for form in cuttable for k in range(len(form) - FRAGMENT + 1)}
    return [(at, at + FRAGMENT) for window in windows for at in _places(text, window)]


def _masked(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each run of overlapping `spans` put as one `MASK`."""
    if not spans:
        return text
    kept, done = [], 0
    for start, end in sorted(spans):
        if start >= done:
            kept.append(text[done:start] + MASK)
        done = max(done, end)
    return "".join(kept) + text[done:]


JSON_ESCAPE = re.compile(
    r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
    r"|u([0-9a-fA-F]{4})|([\"\\\\/bfnrt]))"
)
"""A JSON string's escape: a surrogate pair's two, one `\\uXXXX`, or a short one."""
SHORT_ESCAPES = {
    '\\"': '"',
    "\\\\": "\\",
    "\\/": "/",
    "\\b": "\b",
    "\\f": "\f",
    "\\n": "\n",
    "\\r": "\r",
    "\\t": "\t",
}
"""Each short escape, as written, to what it reads as."""
ESCAPE_OR_CUT = re.compile(JSON_ESCAPE.pattern + r"|(\\(?:u[0-9a-fA-F]{0,3})?(?=…|\.\.\.|\Z))")
r"""An escape, or one a cut left unfinished (`\u00`) at a text's end or
before a cut mark (`CUT_MARKS`): its last group."""


def unescaped(text: str) -> str:
    """`text` with each of JSON's escapes read, one by one: a text cut short,
    or not JSON at all, is read too. A lone surrogate reads as U+FFFD."""
    return JSON_ESCAPE.sub(_one_escape, text)


class _Places:
    """Where each character of a reading (`_read_escapes`) was read from in
    the text before it: kept for its escapes only (a reading's characters
    between two escapes stand as they were), found by bisection."""

    def __init__(self) -> None:
        self.at: list[int] = []
        """The reading's place of each escape's character."""
        self.begins: list[int] = []
        self.ends: list[int] = []
        """Where in the text that escape begins, and ends (one past)."""
        self.cut: dict[int, int] = {}
        """A character an unfinished escape followed: where that escape ends."""

    def start(self, place: int) -> int:
        """Where the reading's character at `place` begins in the text."""
        i = bisect.bisect_right(self.at, place) - 1
        if i < 0:
            return place
        if self.at[i] == place:
            return self.begins[i]
        return self.ends[i] + place - self.at[i] - 1

    def end(self, place: int) -> int:
        """Where it ends in the text (one past), with an unfinished escape
        after it."""
        if place in self.cut:
            return self.cut[place]
        i = bisect.bisect_right(self.at, place) - 1
        if i >= 0 and self.at[i] == place:
            return self.ends[i]
        return self.start(place) + 1


def _read_escapes(text: str, cut_bare: bool = True) -> tuple[str, _Places]:
    r"""`unescaped(text)`, and where each of its characters was read from
    (`_Places`). An escape a cut left unfinished (`ESCAPE_OR_CUT`) is left
    out of the reading and belongs to the character before it: what masks a
    cut secret's head there masks it too (a head followed by `\u00` was
    kept, a QA pass, 2026-12-07). A bare `\` so placed counts only if
    `cut_bare` (in a text's first reading: in the second, it is what an
    escaped backslash right after a secret reads as, not part of it)."""
    out: list[str] = []
    places = _Places()
    done = 0
    length = 0  # of the reading so far
    short = SHORT_ESCAPES
    for escape in ESCAPE_OR_CUT.finditer(text):
        begin, end = escape.span()
        if begin > done:
            out.append(text[done:begin])
            length += begin - done
        if escape.lastindex == 5:  # unfinished
            if end - begin == 1 and not cut_bare:
                out.append("\\")
                length += 1
            elif length:
                places.cut[length - 1] = end
            done = end
            continue
        char = short.get(escape.group()) or _one_escape(escape)
        out.append(char)
        places.at.append(length)
        places.begins.append(begin)
        places.ends.append(end)
        length += 1
        done = end
    out.append(text[done:])
    return "".join(out), places


def _one_escape(escape: re.Match[str]) -> str:
    high, low, code = escape.groups()[:3]
    if high:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
    if code:
        char = int(code, 16)
        return "\ufffd" if 0xD800 <= char <= 0xDFFF else chr(char)
    return SHORT_ESCAPES[escape.group()]


def redact_value(value: Any, secrets: Sequence[str]) -> Any:
    """`value` (JSON: a result, an error) with `redact` applied to each string
    in it, keys too, and the secrets of the environment masked where they
    stand whole (`value_without_environment_secrets`: a run may echo the
    credential a backend sent it); `value` itself when none mentions a
    secret (the usual case, found with a look at its JSON: `_value_mentions`)."""
    data: bytes | None = msgspec.json.encode(value)
    if secrets and data is not None and _value_mentions(data, secrets):
        value, data = _walk(value, secrets), None
    return value_without_environment_secrets(value, data)


def _value_mentions(data: bytes, secrets: Sequence[str]) -> bool:
    """Whether a value's JSON, `data`, holds what `redact` would mask in one
    of its strings: as it stands, or in a string's escapes (`redact` reads
    them: a receipt kept a token written in `\\u` escapes, a QA pass,
    2026-12-07), found in the JSON's readings (one more than a string's,
    for the JSON's own escapes)."""
    if _mentions(data, secrets):
        return True
    return b"\\\\" in data and _read_mentions(data.decode(), secrets, READINGS + 1)


def _mentions(data: bytes, secrets: Sequence[str]) -> bool:
    """Whether `data` holds what `redact` would mask: the beginning of a form
    of a secret (in every whole quote and every cut beginning), the ending
    of a one-word form (in every cut ending), or one of its pieces of
    `MIN_CUT` characters that start where `MIN_CUT` divides the place (any
    piece of `FRAGMENT` characters holds one)."""
    return any(piece in data for secret in secrets if secret for piece in _looked_for(secret)[1])


def _said(text: str, secrets: Sequence[str]) -> bool:
    """`_mentions` for a text as it stands: none of its pieces in `text`
    means `_spans` finds nothing in it."""
    return any(piece in text for secret in secrets for piece in _looked_for(secret)[0])


def _read_mentions(text: str, secrets: Sequence[str], readings: int) -> bool:
    """Whether one of the first `readings` readings of `text` with JSON's
    escapes undone holds what `redact` would mask (`_mentions`): the look
    before `redact_value` walks a value whose JSON holds an escaped
    backslash."""
    for _ in range(readings):
        if "\\" not in text:
            break
        text = unescaped(text)
        if _mentions(text.encode("utf-8", "surrogatepass"), secrets):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def _looked_for(secret: str) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    """The pieces `_mentions` looks for, as text and as UTF-8: each whole
    form's first `MIN_CUT` characters, and each cuttable one's last and
    those that start where `MIN_CUT` divides the place. A head or tail a
    cut left holds one, and so does any window of `FRAGMENT` characters.
    (Kept for the secrets of the last 1,024 looks: a callback token is a
    job's, masked again in each of its outcomes and events.)"""
    whole, cuttable = _forms(secret)
    found = {form[:MIN_CUT] for form in whole}
    for form in cuttable:
        found.add(form[-MIN_CUT:])
        found.update(form[k : k + MIN_CUT] for k in range(0, len(form) - MIN_CUT + 1, MIN_CUT))
    return tuple(found), tuple(piece.encode("utf-8", "surrogatepass") for piece in found)


def _walk(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list | tuple):  # (a plugin's answer may hold a tuple)
        return [_walk(v, secrets) for v in value]
    if isinstance(value, dict):
        return _keys_apart(value, lambda k: redact(k, secrets), lambda v: _walk(v, secrets))
    return value


def _keys_apart(
    value: dict[Any, Any], key: Callable[[str], str], walk: Callable[[Any], Any]
) -> dict[Any, Any]:
    """A dict with its keys masked too (a secret may stand as one), each kept
    apart: a masked key that meets one before it is numbered (`*** (2)`), so
    no value is lost (two masked alike became one: a review, 2026-12-07)."""
    out: dict[Any, Any] = {}
    for k, v in value.items():
        name = key(k) if isinstance(k, str) else k
        if name in out:  # (only a masked key can meet another)
            n = 2
            while f"{name} ({n})" in out:
                n += 1
            name = f"{name} ({n})"
        out[name] = walk(v)
    return out


def redact_bytes(data: bytes, secrets: Iterable[str | None]) -> bytes:
    """`redact` for bytes that are not yet text (an answer's body before it is
    decoded): each form's UTF-8 masked. No cut end: the bytes are whole. An
    empty or missing secret (a header not sent) is skipped."""
    for secret in secrets:
        if secret:
            for form in forms(secret):
                data = data.replace(form.encode(), MASK.encode())
    return data


USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]{0,31}://)[^/?#\s]*@")
"""A URL's `user:password@`, wherever it stands in a text, to its last `@`
(a password may hold one: the HTTP client splits there). The scheme is
anchored and bounded: from every word boundary, as it was, a text of
`a.a.a.…` took seconds for 40 KB (found by a review, 2026-12-06), where
1 MB now takes milliseconds."""
QUERY = re.compile(
    r"((?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://(?:(?!://)[^\s'\"?#])*)\?[^\s'\"#]*"
)
"""A URL's query, wherever it stands in a text (`?api_key=…`, `?code=…`):
its values are masked, its names kept. Anchored as `USERINFO` is, and a URL
ends where another begins: each position is read a bounded number of times."""


def unquoted(text: str) -> str:
    """`text` with any URL's `user:password@` and query masked: the words of
    a library's exception (a plugin's) often quote the URL it called."""

    def masked(url: re.Match[str]) -> str:
        query = url.group(0)[len(url.group(1)) + 1 :]
        return url.group(1) + "?" + "&".join(_masked_pair(p) for p in query.split("&"))

    return QUERY.sub(masked, USERINFO.sub(r"\1***@", text))


def _masked_pair(pair: str) -> str:
    """A query's `name=value` as `name=***` (a value alone: `***`)."""
    name, equals, _ = pair.partition("=")
    return f"{name}=***" if equals else "***"


TETHER_SECRETS = (
    "TETHER_API_TOKEN",
    "TETHER_READ_TOKEN",
    "TETHER_CALLBACK_SECRET",
    "TETHER_CALLBACK_SECRET_PREVIOUS",
    "TETHER_NOTIFY_SECRET",
    "TETHER_NOTIFY_SECRET_PREVIOUS",
)
"""Tether's own secret settings: each a comma-separated list (or one)."""
AUTHORIZATION_PREFIX = "TETHER_WEBHOOK_AUTH_"
"""`http_webhook`'s credentials: whole `Authorization` values, masked in
each form `forms` knows (the credentials alone, a `Basic` one decoded)."""
SECRET_ENDINGS = (
    "_TOKEN",
    "_SECRET",
    "_PASSWORD",
    "_API_KEY",
    "_APIKEY",
    "_ACCESS_KEY",
    "_SECRET_KEY",
    "_PRIVATE_KEY",
)
"""Any other variable whose name ends so holds a secret: a plugin's own
`TETHER_ACME_PASSWORD`, `DATABRICKS_TOKEN`, `DATABRICKS_CLIENT_SECRET`,
`AWS_SECRET_ACCESS_KEY`, `GITHUB_TOKEN`. Only endings: a name that merely
holds such a word is no secret (`GIT_AUTHOR_NAME`, `DATABRICKS_AUTH_TYPE`,
`SORT_KEY`, `TETHER_WRONG_TOKENS_PER_MINUTE`: a review found them masked in
job results, 2026-12-07, when any name with AUTH or KEY in it counted)."""
ENV_SECRET_MIN = 8
"""Values shorter than this are not masked as secrets (a `1`, a `true`)."""
_declared: set[str] = set()
"""Variables plugins declare secret (`declare_secret_settings`)."""


def declare_secret_settings(names: Iterable[str]) -> None:
    """Count these variables among the environment's secrets, whatever
    their names: the settings a plugin marks secret (`core.settings.SECRET`),
    declared when its backends are loaded (`core.plugins.Plugins`)."""
    global _ENVIRONMENT
    new = {name.upper() for name in names} - _declared
    if new:
        _declared.update(new)
        _ENVIRONMENT = None  # read again, with them


def environment_secrets(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secrets the environment holds, at least `ENV_SECRET_MIN`
    characters each, longest first: Tether's own (`TETHER_SECRETS`, each
    of a list), `http_webhook`'s credentials in each of their forms, and the
    value of any variable named as a secret (`SECRET_ENDINGS`) or declared
    one by a plugin (`declare_secret_settings`). What a
    traceback from a plugin may quote (a plugin's own password in its
    exception's words: found by a QA pass, 2026-12-06), and what a run may
    send back (the credential it was sent). Read once a process
    (`_ENVIRONMENT`) unless `env` is given."""
    if env is None:
        global _ENVIRONMENT
        known = _ENVIRONMENT
        if known is None:  # (read into a local: a declaration may reset it meanwhile)
            known = _ENVIRONMENT = environment_secrets(os.environ)
        return known
    found: set[str] = set()
    for name, value in env.items():
        name, value = name.upper(), value.strip()
        if name in TETHER_SECRETS:
            found.update(piece.strip() for piece in value.split(","))
        elif name.startswith(AUTHORIZATION_PREFIX):
            found.update(forms(value))
        elif name.endswith(SECRET_ENDINGS) or name in _declared:
            found.add(value)
    return tuple(sorted((f for f in found if len(f) >= ENV_SECRET_MIN), key=len, reverse=True))


_ENVIRONMENT: tuple[str, ...] | None = None


def value_without_environment_secrets(value: Any, data: bytes | None = None) -> Any:
    """`value` (JSON: a callback's result or error; `data`, its JSON when
    the caller has it) with each of `environment_secrets` masked where it
    stands whole in a string of it; `value` itself when none is in it (one
    look at its JSON). Keys too, each kept apart (`_keys_apart`): a secret
    as a key was kept whole (a QA pass, 2026-12-07). A run may echo what
    it was sent (`TETHER_WEBHOOK_AUTH_<NAME>`: found by a QA pass,
    2026-12-06, kept whole in a job's result)."""
    secrets = environment_secrets()
    if not secrets:
        return value
    data = msgspec.json.encode(value) if data is None else data
    if not any(form in data for secret in secrets for form in _encoded(secret)):
        return value
    return _walk_environment(value)


@functools.cache
def whole_forms(secret: str) -> tuple[str, ...]:
    """How `secret` may stand in a text, whole: as it is, or percent-encoded
    (`_percent_encoded`), and each of those as JSON encoders escape it
    (`_json_escaped`). Longest first. (An environment's secret: not its
    pieces, as `redact` masks a callback token's, since such a value may be
    made of words a text holds too.)"""
    written = {secret, *_percent_encoded(secret)}
    forms = {escaped for form in written for escaped in _json_escaped(form)}
    return tuple(sorted(forms | written, key=len, reverse=True))


def _json_escaped(text: str) -> set[str]:
    """`text` inside a JSON string as encoders write it: Python's
    `ensure_ascii` (`\\u00e4`, as PHP's too), the UTF-8 of JavaScript's,
    msgspec's or serde's, Go's (`&`, `<`, `>` as `\\u0026` ...), each also
    with `/` as `\\/` (PHP's). (A review, 2026-12-07, found Go's and
    JavaScript's forms of a secret of the environment kept whole.)"""
    ascii_only = json.dumps(text)[1:-1]
    utf8 = json.dumps(text, ensure_ascii=False)[1:-1]
    go = utf8.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    escaped = {ascii_only, utf8, go}
    return escaped | {form.replace("/", "\\/") for form in escaped}


@functools.cache
def _encoded(secret: str) -> tuple[bytes, ...]:
    """How each of `whole_forms` of `secret` stands in a JSON text."""
    return tuple(msgspec.json.encode(form)[1:-1] for form in whole_forms(secret))


def _walk_environment(value: Any) -> Any:
    if isinstance(value, str):
        return without_environment_secrets(value)
    if isinstance(value, list | tuple):  # (a plugin's answer may hold a tuple)
        return [_walk_environment(v) for v in value]
    if isinstance(value, dict):
        return _keys_apart(value, without_environment_secrets, _walk_environment)
    return value


def without_environment_secrets(text: str) -> str:
    """`text` with each of `environment_secrets` masked where it stands whole
    (`without_whole`): not its pieces, as `redact` masks a callback token's,
    since such a value may be made of words a traceback holds too."""
    return without_whole(text, environment_secrets())


def without_whole(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of `secrets` masked where it stands whole (as
    written, JSON-escaped or percent-encoded: `whole_forms`)."""
    for secret in secrets:
        for form in whole_forms(secret):
            if form in text:
                text = text.replace(form, MASK)
    return text


def without_secrets(text: str, tokens: Sequence[str] = ()) -> str:
    """A text from outside (a plugin's words, a traceback) as Tether logs or
    shows it: without callback tokens (`tokens`, `redact`), the
    environment's secrets (`without_environment_secrets`) and a URL's
    `user:password@` (`unquoted`)."""
    return unquoted(without_environment_secrets(redact(text, tokens)))


def log_traceback(
    logger: logging.Logger,
    level: int,
    exc: BaseException,
    tokens: Sequence[str],
    message: str,
    *args: Any,
    extra: Mapping[str, Any] | None = None,
    traceback: bool = True,
) -> None:
    """Log `message` with `exc`'s traceback (`exc_text`: the text formatter
    appends it, the JSON one files it as `exc`), of which the messages of
    `exc` and of what it chains may quote a secret: a job's callback tokens
    (`tokens`, every form `redact` knows), the value of each environment
    secret (`environment_secrets`, declared or named as one: a
    plugin's own password, a backend's token, Tether's API tokens) and any
    URL's `user:password@` are masked. The log record never holds the
    exception itself, whose words a formatter would write as they are.
    `traceback` False: the line alone. (`log.exception` wrote a plugin's
    `tether_job_finished` failure whole: a QA pass, 2026-12-07.)"""
    if not logger.isEnabledFor(level):
        return
    path, line, function, _ = logger.findCaller(stacklevel=2)  # the line that called this
    record = logger.makeRecord(
        logger.name, level, path, line, message, args, None, function, extra=dict(extra or {})
    )
    if traceback:
        text = "".join(format_exception(exc)).rstrip()
        record.exc_text = without_secrets(text, tokens)
    logger.handle(record)
