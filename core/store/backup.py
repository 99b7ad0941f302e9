"""Backups of the embedded store: a consistent copy taken while services run,
and bringing one back.

A backup is the database (one self-contained SQLite file, the job index
included) and, beside it as `PATH.secret`, the callback secrets kept beside the
store, so callback URLs handed out before the backup still work after a
restore; and `PATH.notify-secret`, the keys completion notifications are
signed with (the current one, and the previous ones during a rotation), so
receivers need no new key. Each file keeps its secrets in their order; all are
private to their owner (0600).

The copy is SQLite's online backup API in one step: it reads one snapshot of
the database (WAL mode lets writers go on meanwhile; a step-by-step copy would
start over at every commit of a busy service and might never end), so jobs and
promises are copied as they stood at one instant.

A restore is refused while any process has the store open (see
`_refuse_in_use`): the service must be stopped first.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from core.settings import Settings, describe
from core.store.base import LAST_HOST
from core.store.embedded import (
    notify_secret_path,
    read_notify_secrets,
    read_secrets,
    secret_path,
    sqlite_path,
    write_secrets,
)

BACKUP_WAIT = 60.0
"""Seconds a copy may wait for SQLite to let it read or write (a reader of a
WAL database is only ever kept waiting for moments); past it, it gives up."""


class StoreFileError(Exception):
    """A command on the embedded store's files (backup, restore, rotate-secret)
    cannot be done; the message says why. A database file is only ever
    replaced by a complete copy that passed its integrity check."""


class Copied(NamedTuple):
    """What a backup or restore wrote."""

    path: Path
    size: int
    """Bytes of the database file."""
    jobs: int
    waiting: int
    """Jobs not finished: their callback URLs are still to be called."""
    secret: Path | None
    """The secret file written beside it; None when there was none to copy."""
    notify_secret: Path | None = None
    """The notification secret's file written beside it, the same way."""
    set_aside: tuple[Path, ...] = ()
    """A restore's: the store's secret files the backup brought none of,
    renamed (`*.before-restore`) rather than left to pass for its own."""
    notify_kept: bool = False
    """A restore's: the store's own notification secrets were kept, the
    backup's beside them (`restore`)."""


def embedded_db(settings: Settings, command: str) -> Path:
    """The database file of the embedded store `settings.store` names; a
    `StoreFileError` naming the store for any other kind."""
    store = settings.store
    if store.startswith("sqlite:"):
        try:
            return sqlite_path(store)
        except ValueError as exc:
            raise StoreFileError(str(exc)) from None
    kind = "memory:// keeps nothing beyond its process" if store.startswith("memory:") else ""
    raise StoreFileError(
        f"tether {command} works on the embedded store (TETHER_STORE=sqlite:///PATH), not"
        f" {describe(store)}" + (f": {kind}" if kind else "")
    )


def backup(
    db: Path, to: Path, *, force: bool = False, unused: Collection[Callable[[Path], Path]] = ()
) -> Copied:
    """Copy the store `db` (and its secret files) to `to` (and `to.secret`,
    `to.notify-secret`), consistently, while services may be writing to it;
    check the copy. `unused`: the secret files (`secret_path`,
    `notify_secret_path`) the services do not sign with (a setting gives
    theirs), left out: a copy would pass for the secret kept."""
    if not db.is_file():
        raise StoreFileError(f"no embedded store at {db}: nothing to back up")
    if to.exists() and to.resolve() == db.resolve():
        raise StoreFileError(f"{to} is the store itself: back up to another path")
    _refuse_existing(to, force, "a backup")
    kept = [(path_of, lines) for path_of, lines in _secrets_of(db) if path_of not in unused]
    return _copy_database(db, to, kept, replacing=True)


def restore(source: Path, db: Path, *, force: bool = False) -> Copied:
    """Put the backup `source` (and `source.secret`) in place as the store `db`
    (and its secret file). Refuses while any process has the store open."""
    if not source.is_file():
        raise StoreFileError(f"no backup at {source}")
    if db.exists() and db.resolve() == source.resolve():
        raise StoreFileError(f"{source} is the store itself: restore from a backup elsewhere")
    _refuse_existing(db, force, "a store")
    if db.exists():
        _refuse_in_use(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    secrets = _secrets_of(source)
    # The store's own notification secrets, when it has some the backup's
    # differ from, sign first and the backup's beside them: a store whose
    # secret was rotated since the backup signs as its receivers now verify
    # (the backup's came back alone, and every message after the restore
    # was refused until given up: a QA pass), and one of another deployment
    # (a host started once made its own) as the backup's receivers do (its
    # own alone were kept then: the next pass). A store that has none takes
    # the backup's; a backup without one sets the store's aside, as any
    # secret file it brings none of.
    own = _notify_secrets_here(db)
    kept = dict(secrets)
    theirs = kept.get(notify_secret_path)
    both = None
    if own is not None and theirs is not None and own != theirs:
        both = kept[notify_secret_path] = own + [s for s in theirs if s not in own]
        secrets = list(kept.items())
    for leftover in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        # the old database's log must not be replayed onto the restored one
        leftover.unlink(missing_ok=True)
    copied = _copy_database(source, db, secrets, signs=both)
    return copied._replace(notify_kept=both is not None)


def _notify_secrets_here(db: Path) -> list[str] | None:
    """The notification secrets kept beside the store `db`, current first;
    None when it has none, or none that can be read (a restore mends that)."""
    try:
        return read_notify_secrets(notify_secret_path(db))
    except (OSError, ValueError):
        return None


def _refuse_existing(path: Path, force: bool, what: str) -> None:
    if force:
        return
    for existing in (path, secret_path(path), notify_secret_path(path)):
        if existing.exists():
            raise StoreFileError(f"{existing} exists: pass --force to replace {what} there")


SECRET_FILES = ((secret_path, read_secrets), (notify_secret_path, read_notify_secrets))
"""The files of secrets kept beside a database (callback, notification), each
with the reader that checks it and names it in its errors."""

type Kept = list[tuple[Callable[[Path], Path], list[str]]]


def _secrets_of(db: Path) -> Kept:
    """The secret files kept beside `db` that exist (none when its services
    take their secrets from the environment), with their lines."""
    kept: Kept = []
    for path_of, read in SECRET_FILES:
        try:
            kept.append((path_of, read(path_of(db))))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreFileError(f"cannot read {path_of(db)}: {exc.strerror}") from None
    return kept


def _put_secrets(db: Path, kept: Kept) -> tuple[Path | None, Path | None]:
    """Write the secret files `kept` beside where the database `db` goes;
    the callback secret's file and the notification secret's, each if one was."""
    for path_of, secrets in kept:
        try:
            write_secrets(path_of(db), secrets)
        except OSError as exc:
            raise StoreFileError(f"cannot write {path_of(db)}: {exc.strerror}") from None
    written = {path_of for path_of, _ in kept}
    secret = secret_path(db) if secret_path in written else None
    return secret, notify_secret_path(db) if notify_secret_path in written else None


def _refuse_in_use(db: Path) -> None:
    """Refuse when any process has `db` open. Every connection to a WAL
    database holds a shared lock on the file while it is open (a running
    service always has one), so an exclusive lock is only granted when none
    does; the kernel drops a process's locks when it dies, even by SIGKILL."""
    try:
        conn = _open(db, "rw", timeout=0)
    except sqlite3.Error as exc:
        raise StoreFileError(f"cannot open the store {db}: {exc}") from None
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        raise StoreFileError(
            f"the store {db} is in use by another process (a running `tether serve`?):"
            " stop every service using it first, and keep them stopped until the restore ends"
            if "locked" in str(exc) or "busy" in str(exc)
            else f"cannot open the store {db}: {exc}"
        ) from None
    finally:
        conn.close()


STALE_COPY = 3600.0
"""Seconds after which a temp copy beside a backup's path counts as one a
killed backup left (a backup under way renews its file as it writes)."""


def _older(path: Path, seconds: float) -> bool:
    return time.time() - path.stat().st_mtime > seconds


def _copy_database(
    source: Path,
    to: Path,
    kept: Kept,
    *,
    replacing: bool = False,
    signs: list[str] | None = None,
) -> Copied:
    """SQLite's backup of `source` into a new private file beside `to`, made
    self-contained (no WAL), checked with `PRAGMA integrity_check`, then moved
    to `to` at once, after the secret files `kept` were written beside it: a
    database at `to` is a whole copy (a copy killed before that leaves only a
    hidden `.NAME.tether-tmp-*` file, which a backup to `to` an hour later
    deletes). `replacing`: an existing `to` (a backup) is deleted before the
    secrets are written, so no old database is left beside new secrets. A
    secret file `kept` lacks would pass for the copy's own beside `to`: an
    old backup's is deleted, a store's (a restore's `to`) renamed
    `*.before-restore`. `signs`: the notification secrets the copy's services
    sign with from now on, when not the source's (`restore`): its record of
    the last start says so, which its next start compares its own with."""
    prefix = f".{to.name}.tether-tmp-"
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        for stale in to.parent.iterdir():  # a copy killed before it moved (not one under way)
            if stale.name.startswith(prefix) and stale.is_file() and _older(stale, STALE_COPY):
                stale.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(dir=to.parent, prefix=prefix)  # mode 0600
    except OSError as exc:
        raise StoreFileError(f"cannot write in {to.parent}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(name)
    secret: Path | None = None
    try:
        with _connect(source, "ro") as src, _connect(tmp, "rw") as dst:
            deadline = time.monotonic() + BACKUP_WAIT

            def give_up_at_deadline(status: int, remaining: int, total: int) -> None:
                if time.monotonic() > deadline:
                    raise StoreFileError(
                        f"{source} stayed locked for {BACKUP_WAIT:g} s: try again later"
                    )

            src.backup(dst, pages=-1, progress=give_up_at_deadline, sleep=0.05)
            dst.execute("PRAGMA journal_mode = DELETE")
            problems = [row[0] for row in dst.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise StoreFileError(
                    f"the copy of {source} fails its integrity check: {'; '.join(problems[:5])}"
                )
            jobs, waiting = _count_jobs(dst)
            if signs is not None:
                _signed_with(dst, signs)
        _fsync(tmp)
        if replacing:  # the old one goes first: cut short, no database beside new secrets
            to.unlink(missing_ok=True)
        set_aside: list[Path] = []
        for path_of, _ in SECRET_FILES:  # nor its secrets beside a copy that has none
            old = path_of(to)
            if path_of in {written for written, _ in kept} or not old.exists():
                continue
            if replacing:  # an old backup's
                old.unlink()
            else:  # the store's, renamed: a secret nobody else has is not lost
                set_aside.append(old.replace(old.with_name(old.name + ".before-restore")))
        secret, notify_secret = _put_secrets(to, kept)
        tmp.replace(to)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, sqlite3.Error):
            raise StoreFileError(f"cannot copy {source} to {to}: {exc}") from None
        if isinstance(exc, OSError):
            raise StoreFileError(f"cannot copy {source} to {to}: {exc.strerror}") from None
        raise
    return Copied(to, to.stat().st_size, jobs, waiting, secret, notify_secret, tuple(set_aside))


@contextlib.contextmanager
def _connect(db: Path, mode: str) -> Iterator[sqlite3.Connection]:
    """A connection to an existing file that waits up to `BACKUP_WAIT` for locks."""
    conn = _open(db, mode, timeout=BACKUP_WAIT)
    try:
        yield conn
    finally:
        conn.close()


def _open(db: Path, mode: str, timeout: float) -> sqlite3.Connection:
    """`db`, which must exist (`mode` `ro` or `rw`: never created by mistake)."""
    uri = f"{db.resolve().as_uri()}?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)


def _signed_with(conn: sqlite3.Connection, secrets: list[str]) -> None:
    """Record in the store's last start (`LAST_HOST`) that it signed its
    notifications with `secrets` (a restore's, the store's own and the
    backup's: the start after it said they disagreed with the backup's
    record)."""
    from core.tokens import notify_fingerprints  # (it loads the SDK: not for the CLI's start)

    try:
        row = conn.execute("SELECT value FROM tether_meta WHERE name = ?", (LAST_HOST,)).fetchone()
        record = msgspec.json.decode(row[0]) if row else None
    except (sqlite3.OperationalError, msgspec.DecodeError):  # none kept, or one unread
        return
    if isinstance(record, dict) and "notify" in record:
        record["notify"] = notify_fingerprints(secrets)
        value = msgspec.json.encode(record).decode()
        conn.execute("UPDATE tether_meta SET value = ? WHERE name = ?", (value, LAST_HOST))


def _count_jobs(conn: sqlite3.Connection) -> tuple[int, int]:
    """Jobs in the job index, and those not finished (0, 0 without one)."""
    try:
        jobs, waiting = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE finished_at IS NULL) FROM tether_jobs"
        ).fetchone()
    except sqlite3.OperationalError:  # a database Tether has not migrated yet
        return 0, 0
    return int(jobs), int(waiting or 0)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
