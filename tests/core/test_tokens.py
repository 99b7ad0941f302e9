"""Callback tokens and idempotency keys (`core.tokens`), in process: each expected
value is computed here from its definition, not read back from the code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
from datetime import UTC, datetime, timedelta

import pytest

from core import views
from core.models import job_mark
from core.tokens import CallbackSigner, agree, idempotency_key

SECRET = "test-secret"


def expected_token(secret: str, promise_id: str) -> str:
    """The definition: base64url, unpadded, of HMAC-SHA256(secret,
    "tether-callback:" + promise id)."""
    mac = hmac.new(secret.encode(), f"tether-callback:{promise_id}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def test_a_token_is_the_hmac_of_the_promise_id_under_the_secret():
    signer = CallbackSigner(SECRET, "http://tether.example")
    for promise_id in ("job:1", "a", "Job-With.Mixed_Case:1", "x" * 200):
        token = signer.token(promise_id)
        assert token == expected_token(SECRET, promise_id)
        assert len(token) == 43 and "=" not in token
    assert signer.token("job:1") != signer.token("job:2")
    assert CallbackSigner("other", "http://x").token("job:1") != signer.token("job:1")


@pytest.mark.parametrize("secret", ["", None])
def test_an_empty_secret_is_refused(secret):
    with pytest.raises(ValueError, match=r"^the callback secret must not be empty$"):
        CallbackSigner(secret, "http://x")


def test_only_the_exact_token_verifies():
    signer = CallbackSigner(SECRET, "http://x")
    token = signer.token("job:1")
    assert signer.verify("job:1", token) is True
    last = "A" if token[-1] != "A" else "B"
    for wrong in (
        token[:-1] + last,  # last character changed
        token[:-1],  # cut short
        token[:8],  # its first characters only
        token + "A",  # a character added
        token.upper() if token.upper() != token else token.lower(),
        signer.token("job:2"),  # another promise's token
        CallbackSigner("other", "http://x").token("job:1"),  # another secret's
        "",
        None,
    ):
        assert signer.verify("job:1", wrong) is False, wrong


def test_verify_compares_in_constant_time(monkeypatch):
    """The comparison goes through `hmac.compare_digest` (constant time), given
    the expected and the presented token."""
    signer = CallbackSigner(SECRET, "http://x")
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    token = signer.token("job:1")
    assert signer.verify("job:1", token)
    assert not signer.verify("job:1", token[:-1])
    assert seen == [(token.encode(), token.encode()), (token.encode(), token[:-1].encode())]


def test_the_callback_url_carries_the_quoted_promise_id_and_its_token():
    signer = CallbackSigner(SECRET, "https://tether.example/base//")
    assert signer.url("job:1") == (
        f"https://tether.example/base/callbacks/job%3A1?token={expected_token(SECRET, 'job:1')}"
    )
    odd = "a/b c?d&e=f:1"
    assert signer.url(odd) == (
        "https://tether.example/base/callbacks/a%2Fb%20c%3Fd%26e%3Df%3A1"
        f"?token={expected_token(SECRET, odd)}"
    )
    assert CallbackSigner(SECRET, "http://h:1").url("j:1").startswith("http://h:1/callbacks/")
    # only slashes are stripped from the base, whatever it ends with
    assert (
        CallbackSigner(SECRET, "http://h/appX/").url("j:1").startswith("http://h/appX/callbacks/")
    )


def test_the_signer_never_shows_its_key():
    signer = CallbackSigner("very-secret-key", "http://tether.example/")
    assert repr(signer) == "CallbackSigner(base_url='http://tether.example')"
    assert "very-secret-key" not in repr(signer) + str(signer)


# ── rotation: sign with the current secret, accept the previous ones ──────────

OLD, OLDER = "old-secret", "older-secret"


def test_urls_are_signed_with_the_current_secret_whatever_the_previous_ones():
    signer = CallbackSigner(SECRET, "http://x", previous=[OLD, OLDER])
    assert signer.token("job:1") == expected_token(SECRET, "job:1")
    assert (
        signer.url("job:1") == f"http://x/callbacks/job%3A1?token={expected_token(SECRET, 'job:1')}"
    )


def test_a_token_under_the_current_or_any_previous_secret_verifies():
    signer = CallbackSigner(SECRET, "http://x", previous=[OLD, OLDER])
    for secret in (SECRET, OLD, OLDER):
        assert signer.verify("job:1", expected_token(secret, "job:1")) is True, secret
        # a secret's token is good for its own promise only
        assert signer.verify("job:2", expected_token(secret, "job:1")) is False, secret
    for wrong in (expected_token("other", "job:1"), expected_token(OLD, "job:1")[:-1], "", None):
        assert signer.verify("job:1", wrong) is False, wrong


def test_without_previous_secrets_an_old_token_is_refused():
    """Dropping the previous secrets is what ends a rotation: their URLs then fail."""
    assert CallbackSigner(OLD, "http://x").verify("job:1", expected_token(OLD, "job:1"))
    assert not CallbackSigner(SECRET, "http://x").verify("job:1", expected_token(OLD, "job:1"))
    rotated = CallbackSigner(SECRET, "http://x", previous=[OLDER])
    assert not rotated.verify("job:1", expected_token(OLD, "job:1"))


def test_previous_secrets_may_come_from_any_iterable_read_once():
    signer = CallbackSigner(SECRET, "http://x", previous=(s for s in [OLD, OLDER]))
    assert signer.verify("job:1", expected_token(OLD, "job:1"))
    assert signer.verify("job:1", expected_token(OLDER, "job:1"))


@pytest.mark.parametrize("previous", [[""], [OLD, ""], ["", OLD]])
def test_an_empty_previous_secret_is_refused(previous):
    with pytest.raises(ValueError, match=r"^a previous callback secret must not be empty$"):
        CallbackSigner(SECRET, "http://x", previous=previous)


@pytest.mark.parametrize("presented", [SECRET, OLD, OLDER, "other"])
def test_every_candidate_is_compared_in_constant_time_whichever_matches(monkeypatch, presented):
    """One `hmac.compare_digest` per secret, current first, even after a match,
    so the time taken does not tell which secret signed the URL."""
    signer = CallbackSigner(SECRET, "http://x", previous=[OLD, OLDER])
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    token = expected_token(presented, "job:1")
    assert signer.verify("job:1", token) is (presented != "other")
    assert seen == [
        (expected_token(secret, "job:1").encode(), token.encode())
        for secret in (SECRET, OLD, OLDER)
    ]


def test_the_signer_never_shows_a_previous_key():
    signer = CallbackSigner("very-secret-key", "http://tether.example/", previous=["old-key-123"])
    assert repr(signer) == "CallbackSigner(base_url='http://tether.example')"
    assert "old-key-123" not in repr(signer) + str(signer)


def test_an_idempotency_key_is_the_promise_id_when_it_fits():
    assert idempotency_key("job:1") == "job:1"
    fits = "j" * 62 + ":1"
    assert len(fits) == 64 and idempotency_key(fits) == fits


def test_a_long_promise_id_becomes_a_hash_of_64_characters():
    long = "j" * 63 + ":1"
    key = idempotency_key(long)
    assert key == "tether-" + hashlib.sha256(long.encode()).hexdigest()[:57]
    assert len(key) == 64
    assert idempotency_key("k" * 63 + ":1") != key
    assert idempotency_key(long) == key  # stable: the same every time the trigger runs


def test_a_salted_job_has_its_own_token_url_and_key():
    """A job under an id used before (retention deleted the earlier job) has a
    salt: the earlier job's token and key are not its own."""
    signer = CallbackSigner(SECRET, "http://tether.example", previous=[OLD])
    digest = hmac.new(SECRET.encode(), b"tether-callback:job:1#s4lt", hashlib.sha256).digest()
    salted = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert signer.token("job:1", "s4lt") == salted != signer.token("job:1")
    assert signer.token("job:1", None) == signer.token("job:1", "") == signer.token("job:1")
    assert signer.url("job:1", "s4lt").endswith(f"/callbacks/job%3A1?token={salted}")
    assert signer.verify("job:1", salted, "s4lt") and not signer.verify("job:1", salted)
    assert not signer.verify("job:1", signer.token("job:1"), "s4lt")
    assert signer.tokens("job:1", "s4lt") == [
        salted,
        CallbackSigner(OLD, "x").token("job:1", "s4lt"),
    ]
    assert idempotency_key("job:1", "s4lt") == "job:1.s4lt"
    assert idempotency_key("job:1", None) == idempotency_key("job:1", "") == "job:1"
    fits = "j" * 57 + ":1"  # 59 characters, and ".s4lt" makes 64
    assert idempotency_key(fits, "s4lt") == fits + ".s4lt"
    longer = "j" * 58 + ":1"
    key = idempotency_key(longer, "s4lt")
    assert key == "tether-" + hashlib.sha256(f"{longer}.s4lt".encode()).hexdigest()[:57]
    assert key != idempotency_key(longer + "x") and len(key) == 64


def fingerprint(secret: str) -> str:
    """The definition: the first 16 hex digits of HMAC-SHA256(secret,
    "tether-secret-fingerprint")."""
    return hmac.new(secret.encode(), b"tether-secret-fingerprint", hashlib.sha256).hexdigest()[:16]


def test_fingerprints_name_the_secrets_one_way():
    signer = CallbackSigner(SECRET, "http://t", previous=[OLD, OLDER])
    assert signer.fingerprints() == (
        fingerprint(SECRET),
        [fingerprint(SECRET), fingerprint(OLD), fingerprint(OLDER)],
    )
    assert SECRET not in str(signer.fingerprints())


def fingerprints(current: str, *previous: str) -> tuple[str, list[str]]:
    return CallbackSigner(current, "http://t", previous).fingerprints()


def test_every_step_of_a_rotation_agrees_and_a_stray_secret_does_not():
    new, stray = "new-secret-" + "n" * 22, "stray-" + "s" * 27
    steps = [  # each host in turn, as docs/operations.md says
        fingerprints(SECRET),
        fingerprints(SECRET, new),  # 1. accept NEW everywhere
        fingerprints(new, SECRET),  # 2. sign with NEW
        fingerprints(new),  # 4. drop the old one
    ]
    for before, after in itertools.pairwise(steps):
        assert agree(after, before) and agree(before, after)
    assert not agree(fingerprints(stray), fingerprints(SECRET))
    assert not agree(fingerprints(new), fingerprints(SECRET))  # signing before all accept
    assert not agree(fingerprints(SECRET), fingerprints(new))
    assert not agree(fingerprints(SECRET, stray), fingerprints(new, SECRET))  # NEW refused here
    assert not agree(fingerprints(new, SECRET), fingerprints(SECRET, stray))


def test_a_job_mark_names_the_job_by_its_id_and_its_creation_to_the_millisecond():
    """`job_mark`: the first 16 hex digits of SHA-256 of "tether-mark:" +
    the job's id + "@" + its creation in milliseconds. Not secret; another
    for the same id made a millisecond later (another deployment's job)."""
    made = datetime(2026, 12, 5, 10, 0, 0, 123000, tzinfo=UTC)
    seed = f"tether-mark:nightly@{round(made.timestamp() * 1000)}"
    expected = hashlib.sha256(seed.encode()).hexdigest()[:16]
    assert job_mark("nightly", made) == expected
    assert job_mark("nightly", made + timedelta(milliseconds=1)) != expected
    assert job_mark("nightly2", made) != expected


@pytest.mark.parametrize("ms", [1086696834212, 1764929212345, 1796000000001])
def test_a_job_mark_is_of_the_stored_millisecond_through_the_jobs_view(ms: int):
    """The job's creation is stored in milliseconds and handed to backends
    as a datetime (`core.views`): the mark is of that same millisecond (a
    float's truncation would be one off for some, 1086696834212 among them)."""
    seed = f"tether-mark:j@{ms}"
    assert job_mark("j", views._dt(ms)) == hashlib.sha256(seed.encode()).hexdigest()[:16]
