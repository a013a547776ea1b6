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

import contextlib
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

from m2snet import progress
from m2snet.errors import M2SNetError
from m2snet.evaluation.compare import average_seeds, compare_paired, lineage_difference, pair
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL
from m2snet.mlops.cv_results import version_cases
from m2snet.mlops.tracking import mlflow_client
from m2snet.processes import pid_alive
from m2snet.redaction import redact

if TYPE_CHECKING:  # heavy: imported lazily at run time
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)
T = TypeVar("T")

PRODUCTION = "production"
PREVIOUS = "previous"
# Version tags written by register_model_version / promote (plain keys: MLflow's tag search
# grammar handles them without quoting).
IDEMPOTENCY_TAG = "idempotency_key"
SCORE_TAG = "cv_dice"  # the promotion metric: mean CV Dice as a fraction (0..1)
# The no-skill predictor's (all background) mean CV Dice on the same cases, a fraction (0..1); the tag
# cv_dice_noskill holds the same in percent.
NOSKILL_TAG = "noskill_dice"


@dataclass(frozen=True)
class PromotionPolicy:
    """The gate a candidate must pass to become production."""

    floor: float = 0.5  # minimum CV Dice (0..1) any production model must reach
    margin: float = 0.005  # how much it must beat the current production CV Dice by (0..1)
    # How much it must beat the all-background predictor's CV Dice by (0..1): that predictor scores the
    # share of normal (empty-mask) cases, 0.17 on BUSI, so a floor alone lets a model that finds nothing
    # through. 0.05: five Dice points of actual lesion finding.
    noskill_margin: float = 0.05
    metric_tag: str = SCORE_TAG
    noskill_tag: str = NOSKILL_TAG
    # The statistical gate (decide_with_ci): when candidate and production were cross-validated on the
    # same data version and split, the candidate must beat production with the lower bound of the paired
    # bootstrap 95 % CI of the per-case Dice difference above zero, instead of the margin. When they were
    # not (or a side kept no per-case results), the margin rule decides and the reason says so.
    require_ci: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise M2SNetError(f"promotion floor={self.floor} must be within 0..1 (a Dice score)")
        if self.margin < 0:
            raise M2SNetError(f"promotion margin={self.margin} must be >= 0")
        if self.noskill_margin < 0:
            raise M2SNetError(f"promotion noskill_margin={self.noskill_margin} must be >= 0")

    def describe(self) -> str:
        """The gate in one line, as the version's ``promotion_policy`` tag records it."""
        return (f"floor={self.floor:g} margin={self.margin:g} noskill_margin={self.noskill_margin:g} "
                f"require_ci={self.require_ci}")


@dataclass(frozen=True)
class PromotionDecision:
    name: str
    version: str
    promoted: bool
    reason: str
    candidate_score: float | None
    production_version: str | None  # production before the decision
    production_score: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client(tracking_uri: str | None = None, *, writes: bool = False) -> "MlflowClient":
    return mlflow_client(tracking_uri, writes=writes)


def _is_not_found(err: Exception) -> bool:
    code = getattr(err, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(err).lower()


def version_by_alias(name: str, alias: str, client: "MlflowClient | None" = None) -> "ModelVersion | None":
    """The version an alias points to, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _is_not_found(err) or "alias" in str(err).lower():
            return None
        raise


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


PROMOTION_MARK = "**Promotion:**"  # the line of a version's description that promote() rewrites


def describe_version(*, n_folds: int, dataset_version: str, split_sha256: str, cv_metrics: Mapping[str, Any],
                     pipeline_run_id: str = "", metric_protocol: str = DEFAULT_PROTOCOL,
                     guard_rates: Mapping[str, Any] | None = None) -> str:
    """A registered version's description (markdown): what the model is and what it scored."""
    def pct(name: str, stat: str = "mean") -> str:
        mean = cv_metrics.get(f"cv_{name}_{stat}")
        std = cv_metrics.get(f"cv_{name}_std" if stat == "mean" else f"cv_{name}_{stat}_std")
        if mean is None:
            return "n/a"
        return f"{float(mean):.2f} %" + (f" ± {float(std):.2f}" if std is not None else "")

    lines = [
        f"Ensemble of {n_folds} fold models (mean of their foreground probabilities) from one "
        f"{n_folds}-fold cross-validation.",
        "",
        f"- **CV Dice:** {pct('dice')} (mean ± std over folds); IoU {pct('iou')}; "
        f"metric protocol `{metric_protocol}`",
        f"- **No skill (all background) on the same cases:** Dice {pct('dice', 'noskill')}; "
        f"IoU {pct('iou', 'noskill')}",
        f"- **Lesion cases only:** Dice {pct('lesion_dice')} (no skill {pct('lesion_dice', 'noskill')})",
        f"- **Data version:** `{dataset_version}` (DVC hash); split sha256 `{split_sha256[:16]}`",
    ]
    if guard_rates and not guard_rates.get("held_out_cases"):
        lines.append("- **Input guard:** fitted, its false-flag rate not measured (too few held-out cases); "
                     "predictions return `ood_score` and `ood_flag` (score > 1)")
    elif guard_rates:
        lines.append(f"- **Input guard:** flags {100 * float(guard_rates['held_out_flag_rate']):.1f} % of "
                     f"{guard_rates['held_out_cases']} held-out cases of the training data (each scored by the fold "
                     f"model that never trained on it; threshold: quantile {guard_rates['quantile']} of held-out "
                     "distances); predictions return `ood_score` and `ood_flag` (score > 1)")
    if pipeline_run_id:
        lines.append(f"- **Pipeline run:** `{pipeline_run_id}`")
    return "\n".join(lines)


def _with_decision(description: str | None, decision: "PromotionDecision") -> str:
    base = (description or "").split(PROMOTION_MARK)[0].rstrip()
    verdict = "promoted to `production`" if decision.promoted else "not promoted"
    return f"{base}\n\n{PROMOTION_MARK} {verdict} -- {decision.reason}".lstrip()


def version_score(mv: "ModelVersion", metric_tag: str = SCORE_TAG) -> float | None:
    raw = mv.tags.get(metric_tag)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def decide(candidate: float | None, production: float | None, policy: PromotionPolicy, *,
           noskill: float | None = None, production_version: str | None = None) -> tuple[bool, str]:
    """The promotion rule alone (pure: tested without a registry). The reason starts with the rule that
    decided: ``floor``, ``no-skill``, ``production`` (or the missing tag).

    ``noskill``: the candidate's no-skill CV Dice; ``production_version``: the current production version,
    if any (its ``production`` score may be None: registered without CV tags, then nothing to compare with).
    """
    if candidate is None:
        return False, f"candidate has no {policy.metric_tag} tag"
    if candidate < policy.floor:
        return False, f"floor rule: CV Dice {candidate:.4f} is below the floor {policy.floor:.4f}"
    if noskill is None:
        return False, (f"no-skill rule: candidate has no {policy.noskill_tag} tag (the all-background "
                       "predictor's CV Dice); re-run its cross-validation, or --force")
    if candidate < noskill + policy.noskill_margin:
        return False, (f"no-skill rule: CV Dice {candidate:.4f} does not beat the no-skill (all-background) "
                       f"predictor's {noskill:.4f} by the margin {policy.noskill_margin:.4f}")
    passed = (f"all rules pass: CV Dice {candidate:.4f} >= the floor {policy.floor:.4f}, beats no skill "
              f"({noskill:.4f}) by >= {policy.noskill_margin:.4f}")
    if production_version is not None and production is None:
        return False, (f"production rule: production version {production_version} has no {policy.metric_tag} "
                       "tag, so the candidate cannot be compared with it; use --force to replace it")
    if production is None:
        return True, f"{passed}; no production version yet"
    if candidate < production + policy.margin:
        return False, (f"production rule: CV Dice {candidate:.4f} does not beat production's {production:.4f} "
                       f"by the margin {policy.margin:.4f}")
    return True, f"{passed}; beats production's {production:.4f} by >= {policy.margin:.4f}"


# --- the alias lock --------------------------------------------------------------------------------------
# Why a ticket lock in the registry: a file lock beside the store covers a local SQLite file only, and a
# remote tracking server offers no compare-and-set on aliases or tags (set_*_tag is a blind upsert, so a
# "lock tag" two processes write at once can be held by both). What every MLflow registry does offer
# atomically is numbering model versions: version N+1 is created only after N is committed (a primary key
# on (name, version); soft-deleted versions keep their numbers, so a number is never handed out twice).
# So each promote takes a ticket, a new version of a companion model "<name>.alias-lock", and enters when no
# live ticket below its own remains: first come, first served, with no write that two processes can race.
# A crashed holder never blocks for good: a ticket is stale once its process is gone (same host) or its
# lease has lapsed (LOCK_TTL_S; renewed by a heartbeat while its owner waits or holds), and the next waiter
# deletes it (the lease is the owner's clock against the waiter's: hosts' clocks must agree to well within
# it, as NTP keeps them). A holder whose ticket was taken away (its lease lapsed: a frozen process) stops before moving
# any alias (AliasLock.check).
LOCK_MODEL_SUFFIX = ".alias-lock"
LOCK_TTL_S = 60.0  # a ticket's lease; renewed every third of it
LOCK_WAIT_S = 600.0  # how long a promote waits for the lock before giving up, naming the holder
LOCK_POLL_S = 0.2
_OWNER_TAG, _EXPIRES_TAG = "owner", "expires_at"
# A model version needs a source; this one holds no model (an absolute path: a server refuses a relative one).
_LOCK_SOURCE = "m2snet-lock://registry/alias-lock"
_TRANSIENT = ("database is locked", "IntegrityError", "UNIQUE constraint failed", "duplicate key",
              "could not serialize", "deadlock detected")


def _transient(err: Exception) -> bool:
    """A registry error a retry fixes: SQLite's write lock, a unique-key race between two writers (MLflow
    reports both as BAD_REQUEST), an unavailable server."""
    code = getattr(err, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") or any(t in str(err) for t in _TRANSIENT)


def _retrying(fn: Callable[[], T], what: str, tries: int = 8) -> T:
    """``fn()``, retried with jittered back-off on :func:`_transient` errors (concurrent SQLite writers)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            return fn()
        except MlflowException as err:
            if not _transient(err) or attempt == tries - 1:
                raise
            wait = min(5.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.5)
            log.debug("registry: %s failed (%s); retrying in %.2f s", what, str(err).splitlines()[0][:200], wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class AliasLock:
    """One ticket of the alias lock of ``name`` (see the comment above LOCK_MODEL_SUFFIX)."""

    def __init__(self, name: str, client: "MlflowClient", ttl: float = LOCK_TTL_S):
        self.name, self.client, self.ttl = name, client, ttl
        self.model = f"{name}{LOCK_MODEL_SUFFIX}"
        self.owner = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(4)}"
        self.ticket: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost = False

    def _expiry(self) -> str:
        return f"{time.time() + self.ttl:.3f}"

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            _retrying(lambda: self.client.create_registered_model(
                self.model, tags={"m2snet.lock_of": self.name},
                description=f"m2snet's lock on the aliases of `{self.name}`: one version per waiting or "
                            "running `m2snet promote`/`rollback`, deleted when it is done. Not a model."),
                f"create {self.model}")
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise

    def _take_ticket(self) -> None:
        mv = _retrying(lambda: self.client.create_model_version(
            self.model, _LOCK_SOURCE, tags={_OWNER_TAG: self.owner, _EXPIRES_TAG: self._expiry()},
            description=f"ticket of {self.owner}"), f"take a ticket of {self.model}")
        self.ticket = str(mv.version)

    def _stale(self, mv: "ModelVersion") -> bool:
        host, _, rest = mv.tags.get(_OWNER_TAG, "").partition(" ")
        pid = rest.partition(" ")[0]
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            return True
        try:
            return float(mv.tags.get(_EXPIRES_TAG, "0")) < time.time()
        except ValueError:
            return True

    def _tickets(self) -> list["ModelVersion"]:
        escaped = self.model.replace("'", "\\'")
        found = _retrying(lambda: self.client.search_model_versions(f"name = '{escaped}'"),
                          f"list the tickets of {self.model}")
        return sorted(found, key=lambda mv: int(mv.version))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                _retrying(lambda: self.client.set_model_version_tag(self.model, self.ticket, _EXPIRES_TAG,
                                                                    self._expiry()), "renew the lock")
            except Exception as err:  # noqa: BLE001 -- the holder learns it in check(); never kill the thread
                log.warning("model %s: could not renew the alias lock (%s)", self.name, err)

    def acquire(self, timeout: float = LOCK_WAIT_S) -> None:
        from mlflow.exceptions import MlflowException

        self._ensure_model()
        self._take_ticket()
        self._heartbeat = threading.Thread(target=self._renew, name="m2snet-alias-lock", daemon=True)
        self._heartbeat.start()
        deadline = time.monotonic() + timeout
        while True:
            tickets = self._tickets()
            if not any(str(mv.version) == self.ticket for mv in tickets):
                # Our ticket was judged stale and removed (we were frozen past the lease): queue again.
                log.warning("model %s: alias lock ticket %s was removed as stale; taking a new one",
                            self.name, self.ticket)
                self._take_ticket()
                continue
            ahead = [mv for mv in tickets if int(mv.version) < int(self.ticket)]
            for mv in ahead:
                if self._stale(mv):
                    log.warning("model %s: removing the stale alias lock ticket %s of %s (its process is gone "
                                "or its lease lapsed)", self.name, mv.version, mv.tags.get(_OWNER_TAG, "?"))
                    with contextlib.suppress(MlflowException):  # another waiter removed it first
                        self.client.delete_model_version(self.model, mv.version)
            live = [mv for mv in ahead if not self._stale(mv)]
            if not live:
                return
            if time.monotonic() > deadline:
                self.release()
                raise M2SNetError(
                    f"model {self.name!r}: another promote/rollback ({live[0].tags.get(_OWNER_TAG, '?')}) holds the "
                    f"alias lock (registered model {self.model!r}, version {live[0].version}); waited {timeout:.0f} s")
            time.sleep(LOCK_POLL_S * random.uniform(0.5, 1.5))

    def check(self) -> None:
        """Raise when this ticket is no longer there (taken away as stale): moving aliases now could race."""
        from mlflow.exceptions import MlflowException

        try:
            _retrying(lambda: self.client.get_model_version(self.model, self.ticket), "check the alias lock")
        except MlflowException as err:
            if not _is_not_found(err):
                raise
            self.lost = True
            raise M2SNetError(f"model {self.name!r}: lost the alias lock (its lease of {self.ttl:.0f} s lapsed); "
                              "nothing was moved, run the command again") from None

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.ticket is not None:
            try:
                _retrying(lambda: self.client.delete_model_version(self.model, self.ticket), "release the lock")
            except MlflowException as err:  # removed as stale already, or the registry went away: it expires
                log.debug("model %s: releasing the alias lock: %s", self.name, err)
            self.ticket = None


@contextlib.contextmanager
def alias_lock(name: str, client: "MlflowClient", *, ttl: float = LOCK_TTL_S,
               timeout: float = LOCK_WAIT_S) -> Iterator[AliasLock]:
    """Hold the alias lock of registered model ``name`` for the block (waiting for it, first come first
    served); released on exit, whatever happens. Call ``lock.check()`` just before moving aliases."""
    lock = AliasLock(name, client, ttl)
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()


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
            _retrying(lambda: client.set_registered_model_alias(name, PREVIOUS, current_version), "move previous")
        _retrying(lambda: client.set_registered_model_alias(name, PRODUCTION, version), "move production")
        _retrying(lambda: client.set_model_version_tag(name, version, "promoted_at",
                                                       time.strftime("%Y-%m-%dT%H:%M:%S%z")), "tag promoted_at")
    decision = PromotionDecision(
        name=name, version=version, promoted=ok, reason=reason, candidate_score=cand_score,
        production_version=current_version, production_score=prod_score,
    )
    # Retried: another writer of this version's tags (a register step updating them) races on the same rows.
    _retrying(lambda: client.set_model_version_tag(name, version, "promotion_decision",
                                                   ("promoted: " if ok else "rejected: ") + reason), "tag the decision")
    _retrying(lambda: client.set_model_version_tag(name, version, "promotion_policy",
                                                   "forced" if force else policy.describe()), "tag the policy")
    _retrying(lambda: client.update_model_version(name, version,
                                                  description=_with_decision(candidate.description, decision)),
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
    _retrying(lambda: client.set_registered_model_alias(name, PRODUCTION, prev.version), "move production")
    _retrying(lambda: client.delete_registered_model_alias(name, PREVIOUS), "drop previous")
    if current is not None:
        client.set_model_version_tag(name, current.version, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    log.info("model %s: production %s -> %s (rollback)", name, current.version if current else None, prev.version)
    return PromotionDecision(
        name=name, version=str(prev.version), promoted=True, reason="rollback",
        candidate_score=version_score(prev), production_version=str(current.version) if current else None,
        production_score=version_score(current) if current else None,
    )


def decide_with_ci(candidate: float | None, production: float | None, policy: PromotionPolicy,
                   ci: tuple[float, float] | None, why_not: str = "", *, noskill: float | None = None,
                   production_version: str | None = None) -> tuple[bool, str]:
    """``policy.require_ci``: the rules of :func:`decide` (floor, no-skill), then the paired CI (candidate -
    production per-case Dice) instead of the production margin; ``ci`` None (not comparable, ``why_not`` says
    why): the margin rule, saying so (pure, like decide)."""
    ok, reason = decide(candidate, production, policy, noskill=noskill, production_version=production_version)
    # Only the production comparison is the CI's to decide; the floor, the no-skill rule and missing tags stand.
    if production is None or not (ok or reason.startswith("production rule")):
        return ok, reason
    if ci is None:
        return ok, f"{reason} (margin rule: no paired comparison with production, {why_not})"
    low, high = ci
    verdict = "lies above zero" if low > 0 else "does not lie above zero"
    return low > 0, (f"statistical rule: CV Dice {candidate:.4f} vs production's {production:.4f}: the paired 95 % "
                     f"CI of the per-case Dice difference [{low:+.4f}, {high:+.4f}] {verdict}")


def paired_dice_ci(candidate: "ModelVersion", production: "ModelVersion",
                   client: "MlflowClient") -> tuple[tuple[float, float] | None, str]:
    """The bootstrap 95 % CI of candidate - production per-case Dice (m2snet.evaluation.compare), or
    (None, why) when the two cannot be paired: another data version or split, no per-case results."""
    try:
        prod, cand = version_cases(client, production), version_cases(client, candidate)
        problem = lineage_difference(prod.lineage(), cand.lineage(), "production", "candidate")
        if problem:
            return None, problem
        dice = compare_paired(pair(average_seeds(prod.rows, ("dice",), prod.origins),
                                   average_seeds(cand.rows, ("dice",), cand.origins)), ("dice",)).metrics["dice"]
    except M2SNetError as err:
        return None, str(err)
    return (dice.ci_low, dice.ci_high), ""
