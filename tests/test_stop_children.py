"""processes.stop_children_on_signal: SIGTERM/SIGINT reach every process a command started, however deep,
including those a thread pool starts after the signal (as kfp's local runner does with its queued tasks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A command that runs shells (each with a child that ignores SIGINT, as a stuck task would) from a thread
# pool of 2 with 4 queued, the way kfp's local runner runs tasks; it says "started" once two are running.
COMMAND = r"""
import concurrent.futures, subprocess, sys
from m2snet.processes import stop_children_on_signal
from m2snet.signals import Terminated

def task(i):
    return subprocess.run(["sh", "-c", "trap '' INT; sleep 300 & wait"]).returncode

try:
    with stop_children_on_signal(grace_s=2), concurrent.futures.ThreadPoolExecutor(2) as pool:
        print("started", flush=True)
        list(pool.map(task, range(6)))
except KeyboardInterrupt:
    sys.exit(130)
except Terminated:
    sys.exit(143)
"""

def _tagged(tag: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"STOP_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_whole_tree_and_queued_tasks(sig, status):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to find the processes")
    tag = f"{os.getpid()}-{sig}"
    env = {**os.environ, "STOP_TEST_TAG": tag, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", COMMAND], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n"
        deadline = time.monotonic() + 60
        while len(_tagged(tag)) < 5 and time.monotonic() < deadline:  # the command, 2 shells, 2 sleeps
            time.sleep(0.05)
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]  # a hang guard: without the stop, 6 x 300 s of sleep
    finally:
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == status, out
    assert _tagged(tag) == []
