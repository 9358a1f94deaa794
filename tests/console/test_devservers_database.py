"""A configured DATABASE_URL naming a database the server does not have yet (a new user's fresh one):
`make demo` creates it and says so, instead of dying with a traceback; an unreachable server is one
clear line."""

import logging
import uuid

import psycopg
import pytest
from django.conf import settings

from console.devservers import DatabaseUnavailable, database_ensure


def _url(name: str) -> str:
    base = settings.DATABASE_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def _exists(name: str) -> bool:
    with psycopg.connect(_url("postgres"), autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def test_a_missing_database_is_created_and_said(caplog):
    name = f"neocloud_fresh_{uuid.uuid4().hex[:8]}"
    assert not _exists(name)
    try:
        with caplog.at_level(logging.INFO, logger="console.devservers"):
            database_ensure(_url(name))
        assert _exists(name)
        assert f"Created database {name}" in caplog.text
        database_ensure(_url(name))  # there now: nothing to do
    finally:
        with psycopg.connect(_url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_an_unreachable_server_is_one_clear_line():
    with pytest.raises(DatabaseUnavailable, match="Cannot use PostgreSQL at DATABASE_URL") as raised:
        database_ensure("postgres://postgres@127.0.0.1:1/neocloud")
    assert "\n" not in str(raised.value)
