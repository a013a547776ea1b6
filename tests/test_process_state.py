"""The process-wide state a local pipeline run borrows is given back: environment variables, ``sys.stdout`` /
``sys.stderr``, the root logger's handlers and warning capture, after the block and after an exception in it.

The swaps are the ones the local run makes (m2snet.kubeflow.process_state, through RunView and run_local);
tests/test_pipeline_local.py checks the same after a real run_local that fails.
"""

from __future__ import annotations

import io
import logging
import os
import sys

import pytest

from m2snet import progress
from m2snet.kubeflow.process_state import (
    environment,
    environment_defaults,
    root_log_handlers,
    standard_streams,
    warnings_through_logging,
)
from m2snet.kubeflow.runview import RunView


def process_state() -> dict:
    """What a local run may touch, as comparable values."""
    return {"environ": dict(os.environ), "stdout": sys.stdout, "stderr": sys.stderr,
            "root_handlers": list(logging.getLogger().handlers),
            "warnings_captured": getattr(logging, "_warnings_showwarning", None) is not None}


class Boom(Exception):
    pass


def test_environment_sets_unsets_and_restores_even_on_error(monkeypatch):
    monkeypatch.setenv("M2SNET_TEST_KEPT", "caller")
    monkeypatch.delenv("M2SNET_TEST_NEW", raising=False)
    before = process_state()
    with pytest.raises(Boom), environment(M2SNET_TEST_KEPT="run", M2SNET_TEST_NEW="run"):
        assert os.environ["M2SNET_TEST_KEPT"] == os.environ["M2SNET_TEST_NEW"] == "run"
        raise Boom
    assert process_state() == before
    with environment(M2SNET_TEST_KEPT=None):
        assert "M2SNET_TEST_KEPT" not in os.environ
    assert os.environ["M2SNET_TEST_KEPT"] == "caller"


def test_environment_defaults_keep_the_callers_value_and_remove_their_own(monkeypatch):
    monkeypatch.setenv("M2SNET_TEST_KEPT", "caller")
    monkeypatch.delenv("M2SNET_TEST_NEW", raising=False)
    with environment_defaults(M2SNET_TEST_KEPT="default", M2SNET_TEST_NEW="default"):
        assert os.environ["M2SNET_TEST_KEPT"] == "caller" and os.environ["M2SNET_TEST_NEW"] == "default"
    assert os.environ["M2SNET_TEST_KEPT"] == "caller" and "M2SNET_TEST_NEW" not in os.environ


def test_streams_handlers_and_warning_capture_come_back_after_an_error():
    before = process_state()
    out, err = io.StringIO(), io.StringIO()
    # Its own buffer: in a full suite a thread an earlier test left (a server's log, a progress line) may
    # log or print while the streams are swapped; what this test checks is where ITS print went.
    handler = logging.StreamHandler(io.StringIO())
    with pytest.raises(Boom), standard_streams(out, err), root_log_handlers([handler]), warnings_through_logging():
        assert (sys.stdout, sys.stderr) == (out, err) and logging.getLogger().handlers == [handler]
        print("to the stand-in")
        raise Boom
    assert process_state() == before
    assert "to the stand-in\n" in out.getvalue()
    with standard_streams(out):  # stderr None: left alone
        assert sys.stdout is out and sys.stderr is before["stderr"]
    assert process_state() == before


def test_warning_capture_that_was_on_stays_on():
    logging.captureWarnings(True)
    try:
        with warnings_through_logging():
            pass
        assert getattr(logging, "_warnings_showwarning", None) is not None
    finally:
        logging.captureWarnings(False)


@pytest.mark.parametrize("mode", ["plain", "stream", "live"])
def test_run_view_gives_back_what_it_swapped_after_an_error(tmp_path, mode):
    """RunView (the local run's console) swaps all of it for the run; an error inside the run gives it back."""
    before = process_state()
    view = RunView(tmp_path / "logs", [("prepare-dataset", "prepare")], mode=mode, stream=io.StringIO())
    with pytest.raises(Boom), view:
        assert os.environ[progress.ENV] == str(view.events.resolve())
        assert sys.stdout is not before["stdout"]
        logging.getLogger("m2snet.test").warning("from the run")
        raise Boom
    assert process_state() == before
    if mode != "stream":  # the parent's logging went to the run's log, not the caller's handlers
        assert "from the run" in view.main_log.read_text()
