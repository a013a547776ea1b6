"""The registry's MLflow errors told apart: a missing model/version, and a transient one (concurrent
writers, an unavailable server) that a retry fixes."""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

log = logging.getLogger("m2snet.mlops.registry")
T = TypeVar("T")

_TRANSIENT = ("database is locked", "IntegrityError", "UNIQUE constraint failed", "duplicate key",
              "could not serialize", "deadlock detected")


def is_not_found(err: Exception) -> bool:
    """A missing registered model or model version (an alias lock's ticket removed as stale)."""
    code = getattr(err, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(err).lower()


def is_missing_alias(err: Exception) -> bool:
    """The registry's answer to ``get_model_version_by_alias`` for a model that does not exist
    (RESOURCE_DOES_NOT_EXIST) or has no such alias (INVALID_PARAMETER_VALUE, "Registered model alias ...
    not found."): MLflow's SQL and file stores raise these, and its server passes them on. Decided by the
    code, not the text: an unreachable server's message names the .../registered-models/alias endpoint."""
    code = getattr(err, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(err).lower())


def is_transient(err: Exception) -> bool:
    """A registry error a retry fixes: SQLite's write lock, a unique-key race between two writers (MLflow
    reports both as BAD_REQUEST), an unavailable server."""
    code = getattr(err, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") or any(t in str(err) for t in _TRANSIENT)


def retrying(fn: Callable[[], T], what: str, tries: int = 8) -> T:
    """``fn()``, retried with jittered back-off on :func:`is_transient` errors (concurrent SQLite writers)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            return fn()
        except MlflowException as err:
            if not is_transient(err) or attempt == tries - 1:
                raise
            wait = min(5.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.5)
            log.debug("registry: %s failed (%s); retrying in %.2f s", what, str(err).splitlines()[0][:200], wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
