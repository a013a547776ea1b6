"""The alias lock: promotions and rollbacks of one registered model take turns, across processes,
machines and registry backends (a ticket lock kept in the registry itself)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Iterator

from m2snet.errors import M2SNetError
from m2snet.mlops.registry_errors import is_not_found, retrying
from m2snet.processes import pid_alive

if TYPE_CHECKING:  # heavy: imported lazily at run time
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("m2snet.mlops.registry")

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
            retrying(lambda: self.client.create_registered_model(
                self.model, tags={"m2snet.lock_of": self.name},
                description=f"m2snet's lock on the aliases of `{self.name}`: one version per waiting or "
                            "running `m2snet promote`/`rollback`, deleted when it is done. Not a model."),
                f"create {self.model}")
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise

    def _take_ticket(self) -> None:
        mv = retrying(lambda: self.client.create_model_version(
            self.model, _LOCK_SOURCE, tags={_OWNER_TAG: self.owner, _EXPIRES_TAG: self._expiry()},
            description=f"ticket of {self.owner}",
            # Only its number and tags matter; waiting for READY printed MLflow's "Waiting up to 300 seconds for
            # model version to finish creation" on every promote.
            await_creation_for=0), f"take a ticket of {self.model}")
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
        found = retrying(lambda: self.client.search_model_versions(f"name = '{escaped}'"),
                          f"list the tickets of {self.model}")
        return sorted(found, key=lambda mv: int(mv.version))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                retrying(lambda: self.client.set_model_version_tag(self.model, self.ticket, _EXPIRES_TAG,
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
            retrying(lambda: self.client.get_model_version(self.model, self.ticket), "check the alias lock")
        except MlflowException as err:
            if not is_not_found(err):
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
                retrying(lambda: self.client.delete_model_version(self.model, self.ticket), "release the lock")
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
