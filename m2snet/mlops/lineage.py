"""Which data a run used, recorded as an MLflow dataset input (:class:`DatasetLineage`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from m2snet.errors import M2SNetError
from m2snet.redaction import redact

MAX_DATASET_DIGEST = 36  # MLflow's limit; a DVC directory hash ("<md5>.dir") is exactly 36


@dataclass(frozen=True)
class DatasetLineage:
    """Which data a run used, as MLflow records a dataset input.

    ``digest`` is the m2snet data version (the DVC directory hash), ``source`` says where the
    data came from: a DVC repository + revision + path, or a directory.
    """

    name: str
    digest: str
    uri: str  # a directory, or the DVC repository (URL or path)
    dvc_rev: str = ""
    dvc_path: str = ""
    importer: str = ""  # the raw layout it was imported from, if it was
    n_cases: int | None = None

    def __post_init__(self) -> None:
        # A record of where the data came from, never used to fetch it: keep no credentials in it
        # (a DVC repository given as https://user:token@host/... would reach MLflow's inputs verbatim).
        object.__setattr__(self, "uri", redact(self.uri))

    @property
    def source_type(self) -> str:
        # MLflow's UI links "external" sources by their "url" and shows "local" ones by their "uri".
        return "external" if re.match(r"^(https?|ssh|git)://|^git@", self.uri) else "local"

    def source(self) -> dict[str, Any]:
        key = "url" if self.source_type == "external" else "uri"
        extra = {"dvc_rev": self.dvc_rev, "dvc_path": self.dvc_path, "importer": self.importer}
        return {key: self.uri, **{k: v for k, v in extra.items() if v}}

    def to_mlflow(self):
        from mlflow.entities import Dataset

        if len(self.digest) > MAX_DATASET_DIGEST:
            raise M2SNetError(f"dataset {self.name}: digest {self.digest!r} is longer than MLflow's "
                              f"{MAX_DATASET_DIGEST} characters")
        profile = {"num_cases": self.n_cases} if self.n_cases is not None else None
        return Dataset(name=self.name, digest=self.digest, source_type=self.source_type,
                       source=json.dumps(self.source()), profile=json.dumps(profile) if profile else None)

    @classmethod
    def from_mlflow(cls, ds) -> "DatasetLineage":
        try:
            source = json.loads(ds.source or "{}")
        except json.JSONDecodeError:
            source = {"uri": ds.source}
        try:
            n_cases = json.loads(ds.profile).get("num_cases") if ds.profile else None
        except (json.JSONDecodeError, AttributeError):
            n_cases = None
        return cls(name=ds.name, digest=ds.digest, uri=source.get("url") or source.get("uri") or "",
                   dvc_rev=source.get("dvc_rev", ""), dvc_path=source.get("dvc_path", ""),
                   importer=source.get("importer", ""), n_cases=n_cases)
