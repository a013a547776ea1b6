"""Model registry: register a CV model version once, promote it behind a quality gate, roll back.

The registry is MLflow's. One registered model version = one cross-validation: the pyfunc that
averages the fold models' probabilities, tagged with what it was trained on (data version, split
hash), by which pipeline run, and its CV metrics. Serving reads ``models:/<name>@production``.

Promotion moves two aliases and nothing else:

* ``production`` -> the candidate, only if its CV Dice passes an absolute floor, beats the no-skill
  predictor's CV Dice (all background, scored on the same cases) by ``noskill_margin`` AND beats the
  current production version's CV Dice by a margin (``--force`` skips the checks). A production
  version without a CV Dice tag cannot be compared with: the gate refuses (``--force`` to replace it);
* ``previous``   -> the version that was production, so ``rollback`` is one alias move back.

Concurrent promotions are serialised: :func:`promote` and :func:`rollback` read, judge and move the
aliases holding the model's alias lock (:func:`alias_lock`), a lock kept in the registry itself, so it
holds across processes, machines and backends (SQLite, PostgreSQL, a remote ``mlflow server``).

Retries are safe. Registering looks up an existing version carrying the same idempotency key
(the pipeline run id, or a hash of the fold checkpoints) before creating one, and promoting a
version that already is production is a no-op, so a Kubeflow retry of the register/promote step
never creates a second version nor moves ``previous`` onto the production version itself.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

from m2snet import progress
from m2snet.errors import M2SNetError
from m2snet.mlops.alias_lock import AliasLock, alias_lock
from m2snet.mlops.mlflow_store import mlflow_client
from m2snet.mlops.promotion_gate import (
    PromotionDecision,
    PromotionPolicy,
    decide,
    decide_with_ci,
    paired_dice_ci,
    version_score,
)
from m2snet.mlops.registry_errors import is_missing_alias, retrying
from m2snet.mlops.version_description import with_decision
from m2snet.redaction import redact

if TYPE_CHECKING:  # heavy: imported lazily at run time
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

PRODUCTION = "production"
PREVIOUS = "previous"
# Version tags written by register_model_version / promote (plain keys: MLflow's tag search
# grammar handles them without quoting).
IDEMPOTENCY_TAG = "idempotency_key"


def _client(tracking_uri: str | None = None, *, writes: bool = False) -> "MlflowClient":
    return mlflow_client(tracking_uri, writes=writes)


def version_by_alias(name: str, alias: str, client: "MlflowClient | None" = None) -> "ModelVersion | None":
    """The version an alias points to, or None when the registry answers that the model or the alias does
    not exist (:func:`is_missing_alias`). Any other failure (an unreachable server, a refused request) is
    one line naming the alias and MLflow's error, never "no version has the alias"."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if is_missing_alias(err):
            return None
        first = (err.message.strip().splitlines() or [""])[0][:300]
        raise M2SNetError(redact(f"model {name!r}: cannot read the alias {alias!r} from the registry "
                                 f"({err.error_code}: {first})")) from err


def find_version_by_key(name: str, key: str, client: "MlflowClient | None" = None) -> "ModelVersion | None":
    """The (oldest) version of ``name`` registered with idempotency key ``key``, if any."""
    client = client or _client()
    escaped = key.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{name}' and tags.{IDEMPOTENCY_TAG} = '{escaped}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None  # mv.version: int or str


def _wait_ready(client: "MlflowClient", name: str, version: str, timeout: float = 300.0) -> "ModelVersion":
    # File/SQL stores create versions READY at once; remote registries may copy artifacts first.
    deadline = time.monotonic() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise M2SNetError(f"model {name} version {version}: registration ended as {mv.status}")
        time.sleep(1.0)


def register_model_version(
    model_uri: str,
    name: str,
    *,
    idempotency_key: str,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    client: "MlflowClient | None" = None,
) -> "ModelVersion":
    """Register ``model_uri`` as a version of ``name`` once per ``idempotency_key``.

    A second call with the same key returns the version the first call created (its tags are
    brought up to date, nothing else changes).
    """
    if not idempotency_key:
        raise M2SNetError(f"registering {name}: an idempotency key (pipeline run id or checkpoint hash) is required")
    client = client or _client(writes=True)
    tags = {k: redact(str(v)) for k, v in (tags or {}).items()}  # a version's tags are shown to every reader
    existing = find_version_by_key(name, idempotency_key, client)
    if existing is not None:
        log.info("model %s: version %s already registered with %s=%s; not registering again",
                 name, existing.version, IDEMPOTENCY_TAG, idempotency_key)
        for key, value in tags.items():
            if existing.tags.get(key) != value:
                client.set_model_version_tag(name, existing.version, key, value)
        return client.get_model_version(name, existing.version)
    import mlflow

    # mlflow.register_model resolves runs:/ and models:/ URIs (MLflow 3 logged models) and creates
    # the registered model on first use; the idempotency tag is set in the same call.
    mv = mlflow.register_model(
        model_uri, name, tags={**tags, IDEMPOTENCY_TAG: idempotency_key}, await_registration_for=300,
    )
    if description:
        client.update_model_version(name, mv.version, description=redact(description))
    log.info("model %s: registered version %s from %s", name, mv.version, model_uri)
    return _wait_ready(client, name, mv.version)



def promote(
    name: str,
    version: str | int,
    policy: PromotionPolicy = PromotionPolicy(),
    *,
    force: bool = False,
    client: "MlflowClient | None" = None,
) -> PromotionDecision:
    """Point ``production`` at ``version`` if it passes ``policy`` (or ``force``); old one -> ``previous``."""
    from mlflow.exceptions import MlflowException

    client = client or _client(writes=True)
    version = str(version)
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as err:
        raise M2SNetError(f"model {name!r} version {version}: not found in the registry ({err.message})") from err
    # Read, judge and move under the lock: two promotes judged against the same production version both
    # "won", and the later alias move erased the other's promotion (issue 29).
    with alias_lock(name, client) as lock:
        return _promote_locked(name, version, candidate, policy, force, client, lock)


def _promote_locked(name: str, version: str, candidate: "ModelVersion", policy: PromotionPolicy, force: bool,
                    client: "MlflowClient", lock: AliasLock) -> PromotionDecision:
    current = version_by_alias(name, PRODUCTION, client)
    cand_score = version_score(candidate, policy.metric_tag)
    prod_score = version_score(current, policy.metric_tag) if current is not None else None
    current_version = str(current.version) if current is not None else None

    if current_version == version:
        ok, reason = True, "already production (nothing to do)"
    elif force:
        ok, reason = True, "forced (quality gate skipped)"
    elif policy.require_ci and current is not None:
        ok, reason = decide_with_ci(cand_score, prod_score, policy, *paired_dice_ci(candidate, current, client),
                                    noskill=version_score(candidate, policy.noskill_tag),
                                    production_version=current_version)
    else:
        ok, reason = decide(cand_score, prod_score, policy, noskill=version_score(candidate, policy.noskill_tag),
                            production_version=current_version)

    if ok and current_version != version:
        lock.check()
        if current_version is not None:
            retrying(lambda: client.set_registered_model_alias(name, PREVIOUS, current_version), "move previous")
        retrying(lambda: client.set_registered_model_alias(name, PRODUCTION, version), "move production")
        retrying(lambda: client.set_model_version_tag(name, version, "promoted_at",
                                                       time.strftime("%Y-%m-%dT%H:%M:%S%z")), "tag promoted_at")
    decision = PromotionDecision(
        name=name, version=version, promoted=ok, reason=reason, candidate_score=cand_score,
        production_version=current_version, production_score=prod_score,
    )
    # Retried: another writer of this version's tags (a register step updating them) races on the same rows.
    retrying(lambda: client.set_model_version_tag(name, version, "promotion_decision",
                                                   ("promoted: " if ok else "rejected: ") + reason), "tag the decision")
    retrying(lambda: client.set_model_version_tag(name, version, "promotion_policy",
                                                   "forced" if force else policy.describe()), "tag the policy")
    retrying(lambda: client.update_model_version(name, version,
                                                  description=with_decision(candidate.description, decision)),
              "describe the decision")
    log.info("model %s version %s: %s (%s)", name, version, "PROMOTED" if ok else "not promoted", reason)
    progress.emit("promotion", version=version, promoted=ok, reason=reason)
    return decision


def rollback(name: str, *, client: "MlflowClient | None" = None) -> PromotionDecision:
    """Point ``production`` back at ``previous`` and drop the ``previous`` alias.

    Dropping it (rather than swapping) means a second rollback fails loudly instead of
    re-deploying the version that was just rolled back.
    """
    client = client or _client(writes=True)
    if version_by_alias(name, PREVIOUS, client) is None:  # checked again under the lock; no lock model for a typo
        raise M2SNetError(f"model {name!r}: no version has the alias {PREVIOUS!r}, nothing to roll back to")
    with alias_lock(name, client) as lock:
        return _rollback_locked(name, client, lock)


def _rollback_locked(name: str, client: "MlflowClient", lock: AliasLock) -> PromotionDecision:
    prev = version_by_alias(name, PREVIOUS, client)
    if prev is None:
        raise M2SNetError(f"model {name!r}: no version has the alias {PREVIOUS!r}, nothing to roll back to")
    current = version_by_alias(name, PRODUCTION, client)
    lock.check()
    retrying(lambda: client.set_registered_model_alias(name, PRODUCTION, prev.version), "move production")
    retrying(lambda: client.delete_registered_model_alias(name, PREVIOUS), "drop previous")
    if current is not None:
        client.set_model_version_tag(name, current.version, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    log.info("model %s: production %s -> %s (rollback)", name, current.version if current else None, prev.version)
    return PromotionDecision(
        name=name, version=str(prev.version), promoted=True, reason="rollback",
        candidate_score=version_score(prev), production_version=str(current.version) if current else None,
        production_score=version_score(current) if current else None,
    )
