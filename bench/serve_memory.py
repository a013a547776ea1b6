"""Peak memory of `mlflow models serve` answering oversized images and requests (issue 17: one 252 KB
request of a 13000 x 13000 PNG took the server from 1.67 to 3.44 GB, three to 5.5 GB; issue 29: one 2.5 MB
request of twelve 7000 x 7000 PNGs took it from 1.87 to 5.16 GB, two concurrent 6-image ones to 7.7 GB).

Starts the server (``--env-manager local``, one worker) on a model, sends one small image (warm-up),
then ``--requests`` requests of ``--images`` PNGs of ``--side`` x ``--side`` pixels each, ``--concurrent``
at a time, and samples the resident memory of the server's whole process tree every 20 ms. Prints each
answer's status and message and the idle / peak / after RSS as JSON.

    python bench/serve_memory.py                        # a random-weight MSNet logged with this checkout
    python bench/serve_memory.py --side 7000 --images 12 --requests 3 --concurrent 3   # issue 29's case
    python bench/serve_memory.py --model /path/to/model  # any logged pyfunc (its code_paths copy serves)

The served code is the model's own copy of m2snet (code_paths): log the model with the checkout to measure.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw


def random_model(work: Path) -> str:
    """A one-checkpoint pyfunc of a randomly initialised MSNet (memory does not depend on the weights)."""
    import mlflow
    import torch

    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint

    torch.manual_seed(0)
    model = create_model("msnet", n_classes=1, pretrained=False).eval()
    ckpt = Checkpoint(model_name="msnet", model_config={"n_classes": 1}, n_classes=1, image_size=64,
                      state_dict=model.state_dict(), train_config={}, epoch=1).save(work / "model.pt")
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    with mlflow.start_run():
        info = log_segmentation_model([ckpt], name="model")
    return mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(work / "model"))


def big_png(side: int) -> bytes:
    """A grey PNG of side x side pixels that compresses well (shapes on a flat background)."""
    image = Image.new("L", (side, side), 40)
    draw = ImageDraw.Draw(image)
    for k in range(1, 8):
        r = side * k // 18
        draw.ellipse((side // 2 - r, side // 2 - r, side // 2 + r, side // 2 + r), outline=40 + 25 * k, width=9)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self._done = pid, every, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A local pyfunc model directory (default: a random-weight MSNet).")
    parser.add_argument("--side", type=int, default=13000)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--images", type=int, default=1, help="Images per request.")
    parser.add_argument("--concurrent", type=int, default=1, help="Requests in flight at once.")
    parser.add_argument("--max-pixels", help="M2SNET_MAX_PIXELS for the server (default: unset = the default cap).")
    parser.add_argument("--max-request-pixels",
                        help="M2SNET_MAX_REQUEST_PIXELS for the server (default: unset = the default budget).")
    args = parser.parse_args()

    import requests

    from m2snet.mlops.pyfunc_io import encode_image
    from m2snet.mlops.serving import start_model_server

    with tempfile.TemporaryDirectory(prefix="m2snet-serve-memory-") as tmp:
        work = Path(tmp)
        model = args.model or random_model(work)
        env = {name: value for name, value in (("M2SNET_MAX_PIXELS", args.max_pixels),
                                               ("M2SNET_MAX_REQUEST_PIXELS", args.max_request_pixels)) if value}
        server = start_model_server(model, workdir=work / "serve", env=env)
        try:
            def post(png: bytes, n: int = 1):
                body = {"dataframe_split": {"columns": ["image"], "data": [[encode_image(png)]] * n}}
                return requests.post(server.url + "/invocations", json=body, timeout=600)

            small = io.BytesIO()
            Image.fromarray(np.full((64, 64), 90, np.uint8)).save(small, format="PNG")
            warm = post(small.getvalue())
            time.sleep(1.0)
            idle = tree_rss(server.process.pid)
            png = big_png(args.side)
            sampler = PeakSampler(server.process.pid)
            sampler.start()
            with ThreadPoolExecutor(args.concurrent) as pool:
                replies = list(pool.map(lambda _: post(png, args.images), range(args.requests)))
            answers = [{"status": r.status_code, "body": r.text[:300]} for r in replies]
            time.sleep(1.0)
            peak = sampler.stop()
            after = tree_rss(server.process.pid)
        finally:
            server.stop()
    print(json.dumps({
        "side": args.side, "images_per_request": args.images, "concurrent": args.concurrent,
        "image_png_bytes": len(png), "requests": args.requests, "warm_up_status": warm.status_code,
        "idle_rss_gb": round(idle / 1e9, 3), "peak_rss_gb": round(peak / 1e9, 3), "rss_after_gb": round(after / 1e9, 3),
        "answers": answers,
    }, indent=2))


if __name__ == "__main__":
    main()
