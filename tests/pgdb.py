"""A fresh PostgreSQL database per test, on the server `.ci/postgres` starts (127.0.0.1 only).

The server's admin URL comes from CHORUS_TEST_POSTGRES. Without it the PostgreSQL tests skip,
saying how to start one; with CHORUS_REQUIRE_POSTGRES=1 (set by .ci/run) they fail instead,
so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest


def admin_url() -> str:
    url = os.environ.get("CHORUS_TEST_POSTGRES", "")
    if not url:
        why = ('no PostgreSQL server: start one with `eval "$(bash .ci/postgres)"`, which sets '
               "CHORUS_TEST_POSTGRES")
        if os.environ.get("CHORUS_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    return url


def fresh_database(prefix: str = "t") -> Iterator[str]:
    """Create an empty database, yield its URL, drop it (and its connections) afterwards."""
    import psycopg

    admin = admin_url()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_connections(database_url: str) -> int:
    """Kill every server connection to the database, as a PostgreSQL restart or a network drop
    would; returns how many were killed."""
    import psycopg

    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
    return sum(1 for (ok,) in rows if ok)
