"""How stored jobs are shown to clients: the `Job` view and the list cursor."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

from core.errors import InvalidRequest
from core.models import Job
from core.store.jobs import JobRecord


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def view(rec: JobRecord) -> Job:
    """The job as clients (and backends) see it."""
    return Job(
        id=rec.id,
        backend=rec.backend,
        state=rec.state,
        params=rec.params,
        metadata=rec.metadata,
        timeout=rec.timeout,
        external=rec.external,
        result=rec.result,
        error=rec.error,
        created_at=_dt(rec.created_at),
        updated_at=_dt(rec.updated_at),
        finished_at=None if rec.finished_at is None else _dt(rec.finished_at),
    )


def encode_cursor(seq: int) -> str:
    """The opaque `next_cursor` for a page that ends at row `seq`."""
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The row a cursor names; `InvalidRequest` when it is not one Tether made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw[:1] != "s":
            raise ValueError
        return int(raw[1:])
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidRequest(
            "invalid cursor: pass back a next_cursor unchanged", {"field": "cursor"}
        ) from None
