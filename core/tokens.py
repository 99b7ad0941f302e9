"""Callback tokens: an HMAC of the promise id under the callback secret.

Whoever holds a callback URL may settle that one promise and no other. Tokens
are compared in constant time; a wrong token and an unknown promise look alike
to the caller.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote


class CallbackSigner:
    def __init__(self, secret: str, base_url: str) -> None:
        if not secret:
            raise ValueError("the callback secret must not be empty")
        self._key = secret.encode()
        self._base_url = base_url.rstrip("/")

    def __repr__(self) -> str:  # never show the key
        return f"CallbackSigner(base_url={self._base_url!r})"

    def token(self, promise_id: str) -> str:
        digest = hmac.new(self._key, b"tether-callback:" + promise_id.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def verify(self, promise_id: str, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(self.token(promise_id).encode(), token.encode())

    def url(self, promise_id: str) -> str:
        """The callback URL for `promise_id`, token included."""
        path = quote(promise_id, safe="")
        return f"{self._base_url}/callbacks/{path}?token={self.token(promise_id)}"


def idempotency_key(promise_id: str) -> str:
    """A key of at most 64 characters naming one trigger of one job.

    The promise id itself when it fits (readable in the external system), else
    `tether-` and a hash of it.
    """
    if len(promise_id) <= 64:
        return promise_id
    return "tether-" + hashlib.sha256(promise_id.encode()).hexdigest()[:57]
