"""Storage URL -> Optuna storage: SQLite tuned for local processes, pooled servers, journals.

This room answers every storage fact: which backend a URL names, which file a SQLite URL
names, where artifacts go by default, which backends have heartbeats, the heartbeat default,
how long a worker waits out an outage, how long one call may wait for an answer.
"""

from storage._heartbeat import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_RETRY,
    HeartbeatPolicy,
    queue_retry,
)
from storage._network import NetworkBounds
from storage._open import close_storage, open_storage
from storage._retry import DEFAULT_STORAGE_RETRY_S, RetryPolicy, StorageUnavailable
from storage._urls import (
    DEFAULT_STORAGE_URL,
    StorageURLError,
    backend_of,
    default_artifact_dir,
    has_heartbeat,
    redact_url,
    sqlite_file,
)

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_RETRY",
    "DEFAULT_STORAGE_RETRY_S",
    "DEFAULT_STORAGE_URL",
    "NetworkBounds",
    "HeartbeatPolicy",
    "RetryPolicy",
    "StorageURLError",
    "StorageUnavailable",
    "backend_of",
    "close_storage",
    "default_artifact_dir",
    "has_heartbeat",
    "open_storage",
    "queue_retry",
    "redact_url",
    "sqlite_file",
]
