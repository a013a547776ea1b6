"""Serving: predict masks with a registered model, locally or through ``mlflow models serve``.

The model is the pyfunc of :mod:`m2snet.mlops.pyfunc` (one checkpoint or a CV ensemble). Its wire format
(the same in-process and over REST): a DataFrame column ``image`` of base64 PNG/JPEG bytes in, a
``mask`` column of base64 PNG (original size; 0/255 for binary models) and ``foreground_fraction`` out.

    mlflow models serve -m models:/m2snet-busi@production --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"]]}}'

:func:`predict_files` (``m2snet predict``) writes ``<stem>_mask.png`` and ``<stem>_overlay.png``
per input image; :func:`request_masks` is the REST client used by the tests and scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from m2snet.data.cache import default_cache_dir
from m2snet.data.images import check_image, read_rgb
from m2snet.directories import atomic_directory
from m2snet.errors import M2SNetError
from m2snet.mlops.mlflow_store import mlflow_client
from m2snet.mlops.services import LOOPBACK, ManagedProcess
from m2snet.processes import find_tool, free_port
from m2snet.progress import bar as progress_bar

log = logging.getLogger("m2snet.mlops.serving")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OVERLAY_COLOR = (255, 40, 40)
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class Prediction:
    image: Path
    mask: Path
    overlay: Path
    foreground_fraction: float
    ood_score: float | None = None  # the input guard's score (> 1: unlike the training images); None: no guard

    @property
    def ood_flag(self) -> bool | None:
        return None if self.ood_score is None else self.ood_score > 1.0


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, directories expanded to their images (sorted); masks (``*_mask*``) skipped."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
        elif path.is_file():
            found.append(path)
        else:
            raise M2SNetError(f"{path}: no such image file or directory")
    if not found:
        raise M2SNetError(f"no images found in {', '.join(map(str, inputs))}")
    return found


def overlay(image_rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with the mask's foreground tinted (any non-zero class) and its outline drawn solid."""
    out = image_rgb.astype(np.float32).copy()
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * np.asarray(color, np.float32)
    # Outline: foreground pixels with a background 4-neighbour, so the edge stays visible at any alpha.
    padded = np.pad(fg, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[fg & ~inner] = color
    return out.clip(0, 255).astype(np.uint8)


def load_model(model_uri: str, cache_dir: str | os.PathLike | None = None):
    """``mlflow.pyfunc.load_model`` from a local copy (:func:`local_model_dir`), with a clear error for
    an unknown model or alias, and for a model that would be unpickled (:func:`require_model_code`)."""
    import mlflow.pyfunc

    from m2snet.mlops.pyfunc_logging import require_model_code

    local = local_model_dir(model_uri, cache_dir)
    require_model_code(local)
    return mlflow.pyfunc.load_model(str(local))


def local_model_dir(model_uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory holding the model: a local path as it is; a logged or registered model
    downloaded once per (store, model version or run) into ``<cache>/models/``.

    ``mlflow.pyfunc.load_model(uri)`` alone downloads into a fresh temporary directory that nothing
    removes: every prediction left a copy of the ensemble in /tmp (457 MB for the four-fold demo
    model). An alias (``models:/NAME@production``) is resolved to its version first, so moving the
    alias loads the new version; the download is atomic, so a killed one is never taken for a model.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    local = Path(model_uri.removeprefix("file://"))
    if local.is_dir():
        return local
    try:
        dest = Path(cache_dir or default_cache_dir()) / "models" / _model_cache_key(model_uri)
        if not (dest / "model" / "MLmodel").is_file():
            with atomic_directory(dest, shared=True) as tmp:  # concurrent downloads: the first wins
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp / "download")))
                got.rename(tmp / "model")
                shutil.rmtree(tmp / "download", ignore_errors=True)
    except MlflowException as err:
        raise M2SNetError(
            f"--model {model_uri}: cannot load from {mlflow.get_tracking_uri()} ({err.message})"
        ) from None
    return dest / "model"


def _model_cache_key(model_uri: str) -> str:
    """``<name>-v<version>-<hash>`` for a registered model (alias resolved), ``run-<id>-<hash>`` for a
    run's model, ``uri-<hash>`` otherwise; the hash covers the store's URI, so two servers' "v1"
    never share a copy."""
    import mlflow

    registered = registered_version(model_uri)
    if registered:
        ident, store = f"{registered[0]}-v{registered[1]}", mlflow.get_registry_uri()
    elif model_uri.startswith("runs:/"):
        ident, store = "run-" + model_uri.removeprefix("runs:/").split("/", 1)[0], mlflow.get_tracking_uri()
    else:
        ident, store = "uri", mlflow.get_tracking_uri()
    digest = hashlib.sha256(f"{store}|{ident}|{model_uri if not registered else ''}".encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{ident}-{digest}")


def predict_files(model_uri: str, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  batch_size: int = 8, model=None) -> list[Prediction]:
    """Predict every image; write ``<stem>_mask.png`` (as the model returns it) and ``<stem>_overlay.png``.

    Every input's header is checked (decodable format, pixel cap) before the model loads, each image is
    decoded (naming the file when it cannot be) before the model sees it, and the outputs are written to
    a staging folder inside ``out_dir`` and moved in only when all images succeeded: a failure leaves no
    outputs of a partial run.
    """
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from m2snet.mlops.pyfunc_io import decode_mask, encode_image, max_request_pixels, pixel_batches

    images = collect_images(inputs)
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise M2SNetError("several input images share a file name; predict them into separate --out folders")
    sizes = [check_image(path) for path in images]
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".m2snet-predict-", dir=out))
    except OSError as err:
        raise M2SNetError(f"--out {out}: cannot create the output folder ({err.strerror or err})") from None
    done = False
    try:
        model = model or load_model(model_uri)
        results: list[Prediction] = []
        bar = progress_bar(total=len(images), desc="predict", unit="img")
        # Batches within the model's per-request pixel budget, which it refuses above (a served model as well).
        for rows in pixel_batches(sizes, batch_size, max_request_pixels()):
            chunk = [images[i] for i in rows]
            rgbs = [read_rgb(p) for p in chunk]  # the model decodes the same bytes with the same decoder
            frame = pd.DataFrame({"image": [encode_image(p.read_bytes()) for p in chunk]})
            try:
                answer = model.predict(frame)
            except MlflowException as err:
                names = ", ".join(map(str, chunk))
                raise M2SNetError(f"{names}: the model refused the batch ({err.message})") from None
            for path, rgb, (_, row) in zip(chunk, rgbs, answer.iterrows(), strict=True):
                mask = decode_mask(row["mask"])
                if mask.shape[:2] != rgb.shape[:2]:
                    raise M2SNetError(f"{path}: model returned a {mask.shape} mask for a {rgb.shape[:2]} image")
                Image.fromarray(mask).save(staging / f"{path.stem}_mask.png")
                Image.fromarray(overlay(rgb, mask)).save(staging / f"{path.stem}_overlay.png")
                score = row.get("ood_score")
                results.append(Prediction(path, out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png",
                                          float(row["foreground_fraction"]),
                                          None if score is None else float(score)))
            bar.update(len(chunk))
        bar.close()
        for r in results:
            for name in (r.mask.name, r.overlay.name):
                os.replace(staging / name, out / name)
        done = True
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            with contextlib.suppress(OSError):
                out.rmdir()


def request_predictions(url: str, images: Sequence[str | os.PathLike | bytes],
                        timeout: float = 120.0) -> list[dict]:
    """POST images to a running scoring server (``url`` = its base URL); one row per image: its ``mask``
    (decoded), ``foreground_fraction`` and the other columns as the server sent them."""
    import requests

    from m2snet.mlops.pyfunc_io import decode_mask, encode_image

    data = [[encode_image(i if isinstance(i, bytes) else Path(i).read_bytes())] for i in images]
    body = {"dataframe_split": {"columns": ["image"], "data": data}}
    resp = requests.post(url.rstrip("/") + "/invocations", json=body, timeout=timeout)
    if resp.status_code != 200:
        raise M2SNetError(f"{url}/invocations answered {resp.status_code}: {resp.text[:500]}")
    return [{**p, "mask": decode_mask(p["mask"])} for p in resp.json()["predictions"]]


def request_masks(url: str, images: Sequence[str | os.PathLike | bytes], timeout: float = 120.0) -> list[np.ndarray]:
    """The masks of :func:`request_predictions`."""
    return [p["mask"] for p in request_predictions(url, images, timeout)]


@dataclass
class ModelServer:
    url: str
    model_uri: str
    process: object  # m2snet.mlops.services.ManagedProcess

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class ServePlan:
    """What ``m2snet serve`` runs: the version an alias names at start, its local copy, the server's argv."""

    model_uri: str  # as given (models:/NAME@production)
    served_as: str  # NAME/VERSION, or the URI when it names no registered version
    local_dir: Path
    argv: list[str]


def registered_version(model_uri: str) -> tuple[str, str] | None:
    """(name, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the alias resolved now,
    a version checked to exist); None for any other URI."""
    registered = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", model_uri)
    if not registered:
        return None
    name, alias, version = registered.groups()
    if alias:
        from m2snet.mlops.registry import version_by_alias

        found = version_by_alias(name, alias, mlflow_client())
        if found is None:
            raise M2SNetError(f"--model {model_uri}: model {name!r} has no version with the alias {alias!r}")
        version = found.version
    else:
        mlflow_client().get_model_version(name, version)  # an unknown one: MlflowException, as before
    return name, str(version)


def serve_plan(model_uri: str, host: str, port: int, workers: int = 1,
               cache_dir: str | os.PathLike | None = None) -> ServePlan:
    """Resolve the alias ONCE, at start, and download that version: the server then answers as that version
    until it is restarted (``kubectl rollout restart``), which is how promoting or rolling back reaches a
    running deployment; the pyfunc names the version in every response (its ``model_version`` column)."""
    from m2snet.mlops.pyfunc_logging import require_model_code

    pinned = registered_version(model_uri)
    uri = f"models:/{pinned[0]}/{pinned[1]}" if pinned else model_uri
    local = local_model_dir(uri, cache_dir)
    require_model_code(local)
    argv = [find_tool("mlflow"), "models", "serve", "-m", str(local), "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", str(workers)]
    return ServePlan(model_uri, "/".join(pinned) if pinned else model_uri, local, argv)


def start_model_server(model_uri: str, port: int | None = None, *, workdir: str | os.PathLike | None = None,
                       env: dict[str, str] | None = None, timeout: float = 180.0) -> ModelServer:
    """``mlflow models serve -m MODEL_URI --env-manager local`` on loopback; returns once /ping answers."""
    import requests

    port = port or free_port()
    workdir = Path(workdir) if workdir is not None else Path.cwd() / ".m2snet" / "serving"
    mlflow_bin = find_tool("mlflow")
    argv = [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
    proc = ManagedProcess("mlflow models serve", argv, workdir / f"serve-{port}.log", env=env, cwd=workdir)
    url = f"http://{LOOPBACK}:{port}"
    proc.wait_ready(lambda: requests.get(f"{url}/ping", timeout=2).status_code == 200, timeout, f"{url}/ping")
    log.info("serving %s at %s", model_uri, url)
    return ModelServer(url, model_uri, proc)
