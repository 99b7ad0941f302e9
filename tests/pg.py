"""Postgres for tests: the DSN the suite was given, and fresh databases copied
from it. Imports nothing of Tether (``core``, ``api``, ``plugins``), so the
library tests in ``tests/resonate_sqlite`` can use it.

``TETHER_TEST_PG_DSN`` names a template database with resonate-pg's
``resonate.sql`` applied, whose role may ``CREATE DATABASE``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV: str = "TETHER_TEST_PG_DSN"


def pg_dsn(config: pytest.Config) -> str:
    """``TETHER_TEST_PG_DSN``, also when the root conftest already read it and
    removed it from the environment (it clears every ``TETHER_*`` variable)."""
    dsn = os.environ.get(ENV, "")
    if dsn:
        return dsn
    for plugin in config.pluginmanager.get_plugins():
        value = getattr(plugin, "PG_TEMPLATE_DSN", None)
        if isinstance(value, str) and value:
            return value
    return ""


def _admin(template_dsn: str) -> str:
    return urlunsplit(urlsplit(template_dsn)._replace(path="/postgres"))


def fresh_pg_database(template_dsn: str, name: str) -> str:
    """A new database copied from the one `template_dsn` names; its URL."""
    import psycopg

    parts = urlsplit(template_dsn)
    template = parts.path.lstrip("/")
    with psycopg.connect(_admin(template_dsn), autocommit=True) as conn:
        # Names are reused within a run (tests/conftest.py): sessions an earlier
        # test left behind (a hang cut short by a timeout) must not fail this one.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_pg_database(template_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_admin(template_dsn), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
