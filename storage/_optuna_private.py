"""Every private Optuna name storage/ uses, in this one module (search/ has its own).

Each stands in for a public API Optuna lacks; tests/test_optuna_private.py imports and
exercises them all, so an Optuna upgrade that moves one fails there first, by name.
"""

from __future__ import annotations

# Missing API: Optuna's heartbeat interface. `fail_stale_trials` and the heartbeat thread
# work with any storage that inherits it, but only RDBStorage does, and the class is private.
from optuna.storages._heartbeat import BaseHeartbeat

# Missing API: the stale-trial query of BaseHeartbeat has only this private name.
STALE_TRIAL_IDS = "_get_stale_trial_ids"

# Missing API: the cache Optuna puts in front of every RDBStorage (_CachedStorage) reads and
# writes through these private RDBStorage methods, so waiting out an outage must cover them.
RDB_CACHE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id")

__all__ = ["RDB_CACHE_CALLS", "STALE_TRIAL_IDS", "BaseHeartbeat"]
