"""The error a user can fix: a one-line message, no traceback (and the hint for a missing
database driver).

Keep this module free of heavy imports (torch, mlflow, ...): the CLI imports it at start-up.
"""

from __future__ import annotations

import contextlib


class M2SNetError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints its message without a traceback and exits non-zero, so the message
    must say which file or setting is wrong and what is wrong with it.
    """


# Database driver modules SQLAlchemy imports for a storage URL -> what to install. A bare postgresql:// is
# psycopg (3) to SQLAlchemy 2.1; this package installs psycopg2 (postgresql+psycopg2://).
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "pg8000": "pg8000",
                    "pymysql": "PyMySQL", "MySQLdb": "mysqlclient"}


def database_driver_hint(module: str) -> str:
    """What to install for a database driver module SQLAlchemy could not import (an MLflow or Optuna store)."""
    import importlib.util

    hint = f"pip install {DRIVER_PACKAGES.get(module, module)}"
    with contextlib.suppress(ImportError, ValueError):  # find_spec raises for a module blocked in sys.modules
        if module == "psycopg" and importlib.util.find_spec("psycopg2") is not None:
            hint += "; or name the installed psycopg2: postgresql+psycopg2://..."
    return hint
