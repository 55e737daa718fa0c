"""Storage URLs: which backend a URL names, and how to print one without its password."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import sqlalchemy.engine
import sqlalchemy.exc

DEFAULT_STORAGE_URL = "sqlite:///hpo.db"

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
# Every backend has heartbeats (so crash recovery): Optuna's on RDB, storage/_heartbeat.py's
# on the journals.
HEARTBEAT_BACKENDS = (*RDB_SCHEMES, "journal-file", "journal-redis")
ARTIFACT_DIR_NAME = "hpo-artifacts"
JOURNAL_FILE_PREFIX = "journal://"
REDIS_SCHEMES = ("redis", "rediss")
# Query parameters that carry a secret in SQLAlchemy and redis URLs.
SECRET_QUERY_KEYS = ("password", "passwd", "sslpassword")
# psycopg prepares a statement on the server once it ran 5 times on a connection. A pooler in
# transaction mode (PgBouncer before 1.21) runs the next transaction on another server
# connection, which never saw it: `?prepare_threshold=none` turns preparing off (docs/DEPLOY.md).
PREPARE_THRESHOLD_KEY = "prepare_threshold"


class StorageURLError(ValueError):
    """A storage URL this project cannot open; the message is safe to print."""


def redact_url(url: str) -> str:
    """The URL with any password (user:PASSWORD@ or ?password=) replaced by ***."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs)
    if parts.password is None and not secret_query:
        return url  # unparsed: urlunsplit would turn sqlite:/// into sqlite:/
    if secret_query:
        query = [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(query, safe="*"))
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return urlunsplit(parts)


def backend_of(url: str) -> str:
    """One of 'sqlite', 'postgresql', 'mysql', 'journal-file', 'journal-redis'."""
    if url.startswith(JOURNAL_FILE_PREFIX):
        if not url[len(JOURNAL_FILE_PREFIX) :]:
            raise StorageURLError(
                "storage URL 'journal://' needs a file path, e.g. journal://hpo.log"
            )
        return "journal-file"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in REDIS_SCHEMES:
        return "journal-redis"
    dialect = scheme.split("+", 1)[0]
    if dialect not in RDB_SCHEMES:
        raise StorageURLError(
            f"unsupported storage URL {redact_url(url)!r}: use sqlite:///FILE, "
            "postgresql+psycopg://..., mysql+pymysql://..., journal://FILE or redis://HOST"
        )
    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise StorageURLError(f"malformed storage URL {redact_url(url)!r}") from err
    return dialect


def journal_file_path(url: str) -> str:
    return url[len(JOURNAL_FILE_PREFIX) :]


def sqlite_file(url: str) -> Path | None:
    """The database file a SQLite URL names; None for in-memory SQLite and other backends."""
    if backend_of(url) != "sqlite":
        return None
    database = sqlalchemy.engine.make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def default_artifact_dir(url: str) -> Path:
    """Where checkpoints and final weights go by default: beside a SQLite file, else ./."""
    database = sqlite_file(url)
    return (database.parent if database else Path(".")) / ARTIFACT_DIR_NAME


def has_heartbeat(url: str) -> bool:
    """Whether a worker on this storage sends heartbeats, so a dead worker's trial is retried."""
    return backend_of(url) in HEARTBEAT_BACKENDS


def scrub(text: str, url: str) -> str:
    """`text` (an error message, a log line) with the URL's secrets replaced by ***."""
    text = text.replace(url, redact_url(url))
    parts = urlsplit(url)
    secrets = [parts.password] if parts.password else []
    secrets += [v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_QUERY_KEYS and v]
    for secret in secrets:
        text = text.replace(unquote(secret), "***").replace(secret, "***")
    return text


def with_prepare_threshold(params: dict) -> dict:
    """psycopg's connect arguments with `prepare_threshold` from the URL as psycopg takes it:
    a whole number, or None for never (the URL can only say "none")."""
    text = params.get(PREPARE_THRESHOLD_KEY)
    if not isinstance(text, str):
        return params
    if text.lower() in ("none", ""):
        return {**params, PREPARE_THRESHOLD_KEY: None}
    if not text.isdigit():
        raise StorageURLError(
            f"?{PREPARE_THRESHOLD_KEY}={text}: a whole number of runs before psycopg prepares "
            "a statement, or none (behind PgBouncer in transaction mode)"
        )
    return {**params, PREPARE_THRESHOLD_KEY: int(text)}
