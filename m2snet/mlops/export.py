"""ONNX export of one checkpoint or a fold ensemble, served through ONNX Runtime.

The exported graph is :meth:`Predictor.ensemble_probs`: the normalised batch [N, 3, S, S] at the
models' input size to the mean probability of every model (and of the flipped pass with
``tta_flip``). What surrounds it (decoding, resizing, normalising, resizing back, thresholding)
stays in :class:`Predictor`, shared with PyTorch serving, so both back ends give the same masks.

Export runs in eval mode through the TorchScript-based exporter: it folds every BatchNorm that
follows a convolution into the convolution's weights (the written graph is checked to hold no
BatchNormalization node) and keeps the batch axis dynamic. The torch.export-based exporter gives
the same graph but took 10x longer on the M2SNet here. After writing, ONNX Runtime runs the file
on a random batch against PyTorch; a difference above ``atol`` is an error and leaves nothing at
the output path. The checkpoints' metadata (input size, classes, normalisation, tta_flip) rides in
the file's metadata, so the file alone is enough to serve.

Reduced precision (:mod:`m2snet.mlops.precision`, ``m2snet export --precision``) writes either an
int8 ONNX file (static quantization, same metadata plus ``precision``) or, for bf16, a torch bundle of
the checkpoints run under PyTorch's bf16 CPU autocast (ONNX Runtime has no bf16 CPU kernels).
:func:`load_exported` serves any of them; the precision travels in the file's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from torch import nn

from m2snet.errors import M2SNetError
from m2snet.evaluation.guard import POOLED_LEVELS, FeatureBuffer
from m2snet.evaluation.predict import Predictor
from m2snet.files import atomic_file

log = logging.getLogger(__name__)

META_KEY = "m2snet"
INPUT, OUTPUT = "image", "probability"
# Per ensemble member, its pooled encoder features (m2snet.evaluation.guard): what the input guard scores, so
# an exported model is guarded as the PyTorch one is, from the same forward pass.
FEATURES_OUTPUT = "guard_features_{}"
FEATURES_RTOL = 1e-3  # ONNX Runtime vs PyTorch on the features, relative to their largest magnitude
DEFAULT_ATOL = 1e-4  # on probabilities in [0, 1]; fp32 kernels differ by ~1e-6 here
OPSET = 17
PRECISIONS = ("fp32", "bf16", "int8")
BUNDLE_FORMAT = "m2snet-export-bundle"  # the bf16 artifact: {"format", "m2snet": meta, "checkpoints": [...]}


def feature_outputs(n_models: int) -> list[str]:
    return [FEATURES_OUTPUT.format(i) for i in range(n_models)]


class EnsembleProbabilities(nn.Module):
    """The graph that is exported: a Predictor's models (registered here), its ensemble mean, and each
    model's guard features from the same (unflipped) pass."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor
        self.models = nn.ModuleList(predictor.models)
        self.taps = predictor.tap_features(POOLED_LEVELS, as_tensor=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for tap in self.taps:
            tap.take()
        prob = self.predictor.ensemble_probs(x)
        return (prob, *(tap.take() for tap in self.taps))


@dataclass
class ExportReport:
    path: Path
    n_models: int
    image_size: int
    max_abs_diff: float  # ONNX Runtime vs PyTorch on the check batch
    batch_norms_left: int


def onnx_meta(predictor: Predictor, precision: str = "fp32") -> dict:
    meta = predictor.meta
    return {"precision": precision, "image_size": predictor.size, "n_classes": predictor.n_classes,
            "normalization": meta.get("normalization"), "tta_flip": predictor.tta_flip,
            "n_models": len(predictor.models), "model_name": meta.get("model_name"),
            "dataset_version": meta.get("dataset_version"),
            "guard_features": {"levels": list(POOLED_LEVELS), "outputs": feature_outputs(len(predictor.models))}}


def _inline_initializer_aliases(model) -> int:
    """Replace ``Identity(initializer)`` nodes by the initializer itself; return how many.

    The TorchScript exporter deduplicates equal parameters (e.g. ``conv_3.norm.weight`` and
    ``conv_5.norm.weight``, both still 1 in an untrained model) by emitting such Identity nodes.
    ONNX Runtime's graph optimiser then rejects the model ("not a graph input, initializer, or
    output of a previous node"); reading the initializer directly is the same graph.
    """
    inits = {i.name for i in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    if alias.keys() & {o.name for o in model.graph.output}:  # never so for our probability output
        return 0
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for j, name in enumerate(node.input):
            if name in alias:
                node.input[j] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(alias)


def ort_session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def export_onnx(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, *, tta_flip: bool = False,
                atol: float = DEFAULT_ATOL, check_batch: int = 2) -> ExportReport:
    """Write the checkpoints' ensemble as one ONNX graph at ``out`` (see the module docstring)."""
    import onnx

    out = Path(out)
    if not checkpoints:
        raise M2SNetError("export: no checkpoint given")
    predictor = Predictor.from_checkpoints(checkpoints, device="cpu", tta_flip=tta_flip)
    graph = EnsembleProbabilities(predictor).eval()
    outputs = [OUTPUT, *feature_outputs(len(predictor.models))]
    x = torch.randn(check_batch, 3, predictor.size, predictor.size, generator=torch.Generator().manual_seed(0))
    # Written beside ``out`` and renamed into place only once ONNX Runtime agrees with PyTorch.
    with atomic_file(out) as tmp_path:
        # Traced with grad enabled: the fast MSU's no-grad path writes in place (``out=``), which
        # the TorchScript exporter cannot translate; the graph is the same either way.
        with torch.enable_grad(), warnings.catch_warnings():
            # The exporter warns that a shape comparison becomes a constant: it is, at a fixed input size.
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (x,), str(tmp_path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=outputs, do_constant_folding=True,
                              dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]})
        with torch.no_grad():
            expected, *features = (t.numpy() for t in graph(x))
        model = onnx.load(str(tmp_path))
        _inline_initializer_aliases(model)
        set_onnx_meta(model, onnx_meta(predictor))
        onnx.save(model, str(tmp_path))
        batch_norms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
        got, *got_features = ort_session(tmp_path).run(outputs, {INPUT: x.numpy()})
        diff = float(np.abs(got - expected).max())
        if not diff <= atol:
            raise M2SNetError(f"{out}: ONNX Runtime differs from PyTorch by {diff:.3g} (> atol {atol:g}); "
                              "not written")
        for name, want, have in zip(outputs[1:], features, got_features):
            relative = float(np.abs(have - want).max() / max(float(np.abs(want).max()), 1e-12))
            if not relative <= FEATURES_RTOL:
                raise M2SNetError(f"{out}: ONNX Runtime's {name} differs from PyTorch's by {relative:.3g} of "
                                  f"their scale (> {FEATURES_RTOL:g}); not written")
    log.info("exported %d model(s) to %s: max |ORT - PyTorch| %.2e, %d BatchNorm left", len(predictor.models),
             out, diff, batch_norms)
    return ExportReport(out, len(predictor.models), predictor.size, diff, batch_norms)


def model_checkpoints(model_uri: str, dst: str | os.PathLike) -> list[Path]:
    """The checkpoint files of a logged / registered m2snet pyfunc model (``models:/NAME@alias``,
    ``runs:/...``, or a local model directory), downloaded into ``dst``, in ensemble order."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    local = Path(model_uri)
    if not local.is_dir():
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        except MlflowException as err:
            raise M2SNetError(
                f"{model_uri}: cannot download from {mlflow.get_tracking_uri()} ({err.message})"
            ) from None
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise M2SNetError(f"{model_uri}: not an MLflow model (no MLmodel file)")
    artifacts = (yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
                 .get("artifacts") or {})
    keys = sorted((k for k in artifacts if k.startswith("checkpoint_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not keys:
        raise M2SNetError(f"{model_uri}: no checkpoint_<i> artifacts; is it an m2snet pyfunc model?")
    return [local / artifacts[k]["path"] for k in keys]


def set_onnx_meta(model, meta: dict) -> None:
    """Write (or replace) the m2snet metadata entry of a loaded ONNX model."""
    kept = [(e.key, e.value) for e in model.metadata_props if e.key != META_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (META_KEY, json.dumps(meta))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def is_bundle(path: str | os.PathLike) -> bool:
    """A bf16 torch bundle (a zip written by torch.save), not an ONNX protobuf."""
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def write_bundle(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, meta: dict) -> Path:
    """The bf16 artifact: the checkpoints' inference form and the export metadata in one torch file
    (tensors and plain data only, so it loads with ``weights_only=True``)."""
    from m2snet.models.checkpoint import Checkpoint

    payload = {"format": BUNDLE_FORMAT, META_KEY: meta,
               "checkpoints": [Checkpoint.load(p).slim().to_dict() for p in checkpoints]}
    with atomic_file(out) as tmp:
        torch.save(payload, tmp)
    return Path(out)


def _read_bundle(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise M2SNetError(f"{path}: not an m2snet export bundle ({str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise M2SNetError(f"{path}: not an m2snet export bundle; export it with `m2snet export --precision bf16`")
    return payload


def read_export_meta(path: str | os.PathLike) -> dict:
    """The m2snet metadata of any exported file (ONNX or bf16 bundle); ``precision`` defaults to fp32
    for files written before reduced precision existed."""
    path = Path(path)
    if not path.is_file():
        raise M2SNetError(f"{path}: exported model not found")
    meta = _read_bundle(path)[META_KEY] if is_bundle(path) else read_onnx_meta(path)
    return {"precision": "fp32", **meta}


def read_onnx_meta(path: str | os.PathLike) -> dict:
    """The m2snet metadata of an exported file (without loading the graph's weights)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise M2SNetError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise M2SNetError(f"{path}: not an ONNX file ({err})") from None
    for entry in model.metadata_props:
        if entry.key == META_KEY:
            return json.loads(entry.value)
    raise M2SNetError(f"{path}: no {META_KEY!r} metadata; export it with `m2snet export`")


class OnnxPredictor(Predictor):
    """A :class:`Predictor` whose ensemble runs in ONNX Runtime (same pre- and post-processing)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 8,
                 threads: int | None = None) -> None:
        meta = read_onnx_meta(path)
        self.path = Path(path)
        self.precision = meta.get("precision", "fp32")
        self.session = ort_session(path, device, threads)
        self.models = []
        self.meta = meta
        self.device = "cpu"  # inputs are handed to ONNX Runtime as numpy arrays
        self.size = int(meta["image_size"])
        self.n_classes = int(meta["n_classes"])
        norm = meta["normalization"]
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.tta_flip = bool(meta["tta_flip"])
        self.batch_size = batch_size
        self.guard = None
        self._taps = []
        # Files exported before the guard features existed have none: such a model is served unguarded.
        self.features = meta.get("guard_features") or {"levels": [], "outputs": []}

    @property
    def guardable(self) -> bool:
        return bool(self.features["outputs"])

    def attach_guard(self, guard) -> None:
        """Score every image against ``guard`` from the graph's feature outputs (the same forward pass)."""
        outputs = list(self.features["outputs"])
        if not self.guardable:
            raise M2SNetError(f"{self.path}: exported without the guard's feature outputs (an older export); "
                              "export it again to serve it guarded")
        if tuple(guard.levels) != tuple(self.features["levels"]) or len(guard.members) != len(outputs):
            raise M2SNetError(f"{self.path}: its feature outputs (levels {self.features['levels']}, "
                              f"{len(outputs)} models) do not fit the input guard (levels {list(guard.levels)}, "
                              f"{len(guard.members)} members)")
        self.guard = guard
        self._taps = [FeatureBuffer() for _ in outputs]

    def ensemble_probs(self, x: torch.Tensor) -> torch.Tensor:
        # The feature outputs are asked for (and computed) only while a guard is attached.
        names = [OUTPUT, *(self.features["outputs"] if self._taps else [])]
        prob, *features = self.session.run(names, {INPUT: x.cpu().numpy()})
        for tap, batch in zip(self._taps, features):
            tap.batches.append(batch.astype(np.float32, copy=False))
        return torch.from_numpy(prob)


class AutocastPredictor(Predictor):
    """A :class:`Predictor` whose models run under PyTorch's CPU autocast in ``dtype`` (bf16):
    convolutions and matmuls in bf16 through oneDNN, reductions and the output in fp32."""

    def __init__(self, *args, dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dtype = dtype
        self.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def ensemble_probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=torch.device(self.device).type, dtype=self.dtype):
            return super().ensemble_probs(x).float()


def load_bundle(path: str | os.PathLike, device: str = "cpu", batch_size: int = 8) -> AutocastPredictor:
    from m2snet.models.checkpoint import Checkpoint

    path = Path(path)
    payload = _read_bundle(path)
    meta = payload[META_KEY]
    ckpts = [Checkpoint.from_dict(c, path) for c in payload["checkpoints"]]
    return AutocastPredictor([c.build_model(device) for c in ckpts], {**ckpts[0].meta(), **meta}, device=device,
                             tta_flip=bool(meta["tta_flip"]), batch_size=batch_size)


def load_exported(path: str | os.PathLike, device: str = "cpu", batch_size: int = 8,
                  threads: int | None = None) -> Predictor:
    """The predictor of an exported file at its precision: ONNX Runtime for fp32 / int8 ONNX, PyTorch
    bf16 autocast for a bundle."""
    if Path(path).is_file() and is_bundle(path):
        return load_bundle(path, device=device, batch_size=batch_size)
    return OnnxPredictor(path, device=device, batch_size=batch_size, threads=threads)
