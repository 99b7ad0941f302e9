"""Callback tokens: an HMAC of the promise id under the callback secret.

Whoever holds a callback URL may settle that one promise and no other. Tokens
are compared in constant time; a wrong token and an unknown promise look alike
to the caller.

The secret can be rotated without orphaning waiting jobs: URLs are signed with
the current secret, and a token made under any of the previous ones is still
accepted until the operator drops them (docs/operations.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from urllib.parse import quote

from core.workflow import callback_promise_id


def fingerprint(secret: str) -> str:
    """A one-way fingerprint of a callback secret: what the store keeps of
    the secret a start signed with (`CallbackSigner.fingerprints`)."""
    return hmac.new(secret.encode(), b"tether-secret-fingerprint", hashlib.sha256).hexdigest()[:16]


class CallbackSigner:
    """Signs with `secret`; verifies against `secret` and each of `previous`."""

    def __init__(self, secret: str, base_url: str, previous: Iterable[str] = ()) -> None:
        if not secret:
            raise ValueError("the callback secret must not be empty")
        older = tuple(previous)
        if not all(older):
            raise ValueError("a previous callback secret must not be empty")
        self._key = secret.encode()
        self._base_url = base_url.rstrip("/")
        self._previous = tuple(CallbackSigner(s, base_url) for s in older)

    def __repr__(self) -> str:  # never show a key
        return f"CallbackSigner(base_url={self._base_url!r})"

    def token(self, promise_id: str, salt: str | None = None) -> str:
        """The token of `promise_id`'s URL; with the job's `salt` (an id used
        again after retention: `JobRecord.salt`), another than the earlier
        job's under that id."""
        signed = f"{promise_id}#{salt}" if salt else promise_id
        digest = hmac.new(self._key, b"tether-callback:" + signed.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def fingerprints(self) -> tuple[str, list[str]]:
        """Who signs with what, without the secrets: a one-way fingerprint of
        the secret (`fingerprint`) and of each one accepted (it, then the
        previous ones). Hosts sharing a store compare them (`agree`)."""
        return self._fingerprint(), [s._fingerprint() for s in (self, *self._previous)]

    def _fingerprint(self) -> str:
        return fingerprint(self._key.decode())

    def tokens(self, promise_id: str, salt: str | None = None) -> list[str]:
        """`promise_id`'s token under the secret and under each previous one:
        every token a URL handed out for it may carry (what to mask)."""
        return [signer.token(promise_id, salt) for signer in (self, *self._previous)]

    def job_tokens(self, job_id: str, attempt: int, salt: str | None = None) -> list[str]:
        """The tokens of every callback URL job `job_id` was handed up to
        attempt `attempt` (`tokens` of each attempt's promise): what to mask
        in anything kept of it. An earlier attempt's URL no longer settles
        anything, but its token is a secret all the same, and a receiver or
        a run may quote it in a later attempt's answer."""
        return [
            token
            for at in range(1, max(attempt, 1) + 1)
            for token in self.tokens(callback_promise_id(job_id, at), salt)
        ]

    def verify(self, promise_id: str, token: str | None, salt: str | None = None) -> bool:
        """Whether `token` is `promise_id`'s token under the secret or a previous
        one. Every candidate is compared, whichever matches, so the time taken
        does not tell which did (nor that a rotation is under way)."""
        if not token:
            return False
        presented = token.encode()
        matched = False
        for signer in (self, *self._previous):
            matched |= hmac.compare_digest(signer.token(promise_id, salt).encode(), presented)
        return matched

    def url(self, promise_id: str, salt: str | None = None) -> str:
        """The callback URL for `promise_id`, token included."""
        path = quote(promise_id, safe="")
        return f"{self._base_url}/callbacks/{path}?token={self.token(promise_id, salt)}"


def notify_fingerprints(secrets: Sequence[str]) -> list[str]:
    """One-way fingerprints of the notification secrets a host signs with
    (`Store.notify_secrets`, current first), compared between hosts as the
    callback secrets' are (`fingerprints`)."""
    return [
        hmac.new(s.encode(), b"tether-notify-fingerprint", hashlib.sha256).hexdigest()[:16]
        for s in secrets
    ]


def agree(mine: tuple[str, list[str]], theirs: tuple[str, list[str]]) -> bool:
    """Whether two hosts' callback URLs work on each other: each accepts the
    secret the other signs with. True at every step of a rotation done as
    docs/operations.md says (accept the new one everywhere, then sign with it)."""
    return mine[0] in theirs[1] and theirs[0] in mine[1]


def idempotency_key(promise_id: str, salt: str | None = None) -> str:
    """A key of at most 64 characters naming one trigger of one job.

    The promise id itself when it fits (readable in the external system), else
    `tether-` and a hash of it. With the job's `salt` (an id used again after
    retention), `{promise_id}.{salt}`: another key than the earlier job's.
    """
    key = f"{promise_id}.{salt}" if salt else promise_id
    if len(key) <= 64:
        return key
    return "tether-" + hashlib.sha256(key.encode()).hexdigest()[:57]
