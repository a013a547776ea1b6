"""Secrets never reach a log, an MLflow param/tag/input or a file we write: :func:`redact` and
:func:`install_redaction`.

Keep this module free of heavy imports (torch, mlflow, ...): the CLI imports it at start-up.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

# --- secrets: what never reaches a log, an MLflow param/tag/input or a file we write ---------------
# A name that says its value is a secret (a config key, a query parameter).
SECRET_NAME = re.compile(
    r"secret|passw|pwd|token|credential|access_?key|api_?key|private_?key|signature|^sig$|^key$|^auth", re.I)
# A URL's userinfo: everything between "scheme://" and the LAST "@" before the host part ends, so a
# password holding "@" (invalid unescaped, yet common) is covered whole.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@", re.I)
# A value ends at the next parameter, a fragment, white space or a quote (a URL quoted in an error message).
_QUERY_PARAM = re.compile(r"""(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s'"<>]*)""")
REDACTED = "***"


def _redact_userinfo(m: re.Match) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    # "user:password@" keeps the user; a lone "TOKEN@" (GitHub, GitLab tokens) may itself be the secret.
    return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"


# Environment variables named like secrets that hold none: the working directory (``PWD`` matches "pwd") and
# the *path* of a credentials file (GOOGLE_APPLICATION_CREDENTIALS, AWS_SHARED_CREDENTIALS_FILE).
_NOT_SECRET_ENV = re.compile(r"^(?:OLD)?PWD$|_(?:FILE|PATH|DIR|CREDENTIALS)$", re.I)
# A shorter value is not masked wherever it appears: "pw" or "1" would blank unrelated text, and so little
# entropy is no secret worth the noise. URL userinfo and secret query parameters are masked at any length.
_MIN_ENV_SECRET = 6


def _env_secrets() -> list[str]:
    """Secret values this process holds in its environment: variables named like secrets
    (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, *_TOKEN, ...) and the passwords inside URLs
    (MLFLOW_TRACKING_URI=http://user:pw@host). Read on every call: tests and tools change the environment."""
    found = set()
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and not _NOT_SECRET_ENV.search(name):
            found.add(value.strip())
        for m in _URL_USERINFO.finditer(value):
            found.add(m["userinfo"].partition(":")[2] or m["userinfo"])
    # Longest first: a secret that contains another is masked whole.
    return sorted((s for s in found if len(s) >= _MIN_ENV_SECRET), key=len, reverse=True)


def redact(value: Any) -> Any:
    """``value`` with the credentials it holds masked; non-strings are returned as they are.

    Masks, in URLs: ``user:password@`` (keeping the user), a token-only ``TOKEN@`` and the values of
    secret-named query parameters (``?password=``, ``&token=``, ``access_key=``, ``X-Amz-Signature=``,
    ``sig=``, ...); anywhere: the value of a secret-named environment variable (``AWS_SECRET_ACCESS_KEY``,
    ``MLFLOW_TRACKING_PASSWORD``, ...) or a password inside a URL-valued one. THE redaction: every line
    that leaves the process goes through it (:func:`install_redaction` for logs and warnings, the CLI's
    error line, MLflow params/tags/descriptions, log files uploaded as artifacts).
    """
    if not isinstance(value, str):
        return value
    text = _URL_USERINFO.sub(_redact_userinfo, value)
    text = _QUERY_PARAM.sub(
        lambda m: f"{m['sep']}{m['name']}={REDACTED}" if SECRET_NAME.search(m["name"]) else m[0], text)
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    return text


def _redact_record(record: logging.LogRecord) -> None:
    """Mask the message, exception and stack text of ``record`` in place (all of them: a library's
    exception message repeats the URL it failed on)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 -- a malformed format call: logging reports it when the record is emitted
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        # Formatter.format uses exc_text when set: the traceback is formatted once, here, masked.
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install_redaction() -> None:
    """Mask secrets in every log record of this process, whichever logger made it and whichever handler
    writes it (ours, MLflow's own stream handler, a task's log file), and route ``warnings`` through
    logging so library warnings (urllib3's retries print the URL with its ``?token=``) are masked too.

    Done in the record factory rather than in a filter on the root handlers: MLflow's logger writes
    through its own handler and does not propagate. Idempotent.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "m2snet_redacting", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        _redact_record(record)
        return record

    redacting_factory.m2snet_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
    logging.captureWarnings(True)
