"""Storage URL -> Optuna storage: SQLite tuned for local processes, pooled servers, journals."""

from storage._open import HeartbeatPolicy, open_storage
from storage._urls import DEFAULT_STORAGE_URL, StorageURLError, backend_of, redact_url

__all__ = [
    "DEFAULT_STORAGE_URL",
    "HeartbeatPolicy",
    "StorageURLError",
    "backend_of",
    "open_storage",
    "redact_url",
]
