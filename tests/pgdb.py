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


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CHORUS_REQUIRE_POSTGRES"):
        pytest.fail(why)
    pytest.skip(why)


def admin_url() -> str:
    url = os.environ.get("CHORUS_TEST_POSTGRES", "")
    if not url:
        _skip_or_fail('no PostgreSQL server: start one with `eval "$(bash .ci/postgres)"`, which '
                      "sets CHORUS_TEST_POSTGRES")
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


PASSWORD_GROUP = "chorus_password_login"  # .ci/postgres: its members log in with a password


def password_database(prefix: str = "pw") -> Iterator[tuple[str, str, str]]:
    """A login role that must give its password over TCP (pg_hba.conf's rule for members of
    chorus_password_login, which .ci/postgres writes), and an empty database it owns. Yields
    (URL with the role but no password, role, password); drops both afterwards. Skips (fails
    where CHORUS_REQUIRE_POSTGRES is set) on a server that lets the role in without its password,
    e.g. one started by an older .ci/postgres."""
    import psycopg

    admin = admin_url()
    tag = uuid.uuid4().hex[:10]
    role, name, password = f"{prefix}_{tag}", f"{prefix}_{tag}", f"pw-{uuid.uuid4().hex}"
    info = psycopg.conninfo.conninfo_to_dict(admin)
    host, port = info.get("host", "127.0.0.1"), info.get("port", "5432")
    why = (f"the PostgreSQL server at {host}:{port} does not ask members of {PASSWORD_GROUP} for "
           f"a password: restart it with `eval \"$(bash .ci/postgres)\"`, whose pg_hba.conf does")
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_GROUP,)).fetchone():
            _skip_or_fail(why)
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}' IN ROLE {PASSWORD_GROUP}")
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')
    try:
        url = f"postgresql://{role}@{host}:{port}/{name}"
        try:  # the server must refuse a wrong password, or the test proves nothing
            psycopg.connect(url, password="not-" + password, connect_timeout=10).close()
        except psycopg.OperationalError as e:
            if "password authentication failed" not in str(e):
                raise
        else:
            _skip_or_fail(why)
        yield url, role, password
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
