"""Waiting out a store's transient faults: which errors are worth a retry, and the retry loop.

Shared by the Optuna storage (`engine/storage.py`) and the MLflow tracker (`tracking/tracker.py`); each
passes its own classifier and time budget to `with_retry`:

  * storage: `is_transient` (a locked SQLite database, a dropped or refused PostgreSQL/MySQL
    connection), CHORUS_STORAGE_RETRY_S seconds (default 120); `is_dropped` when a store is
    first opened, so a wrong URL or a server that is not up is an error at once;
  * tracking: `tracking_transient` (server unreachable or overloaded, SQLite locked),
    CHORUS_TRACKING_RETRY_S seconds (default 120), on top of MLflow's own per-request retries.

The loop itself is tenacity's: exponential backoff from 0.2 s, doubling, capped at 10 s,
jittered by +-25 % so that workers that lost the same server do not come back in step, and no
attempt started once the budget would be spent by the wait before it.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Callable, Optional, TypeVar

import sqlalchemy.exc
import tenacity

T = TypeVar("T")


class StoreError(RuntimeError):
    """A storage or tracking store that cannot be opened; one line for the user."""


class StoreUnavailable(RuntimeError):
    """A store went away mid-study and stayed away past the retries; one line for the user."""


def env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise StoreError(f"environment {name}={raw!r}: must be a whole number of seconds >= 1")
    return int(raw)


def retry_budget_s() -> int:
    return env_seconds("CHORUS_STORAGE_RETRY_S", 120)


def tracking_retry_budget_s() -> int:
    return env_seconds("CHORUS_TRACKING_RETRY_S", 120)


def describe_error(e: BaseException, width: int = 200) -> str:
    """'Type: first line of the message', for one-line errors (an empty message is fine too)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:width] if lines else ''}"


# ------------------------------------------------------------------------ classification
def is_transient(e: BaseException) -> bool:
    """A storage fault worth waiting out: a locked SQLite database or a lost/refused DB connection.

    Optuna re-raises SQLAlchemy's errors from a commit as StorageInternalError, so the chain of
    causes is searched.
    """
    seen = 0
    while e is not None and seen < 5:
        if _is_transient_one(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _is_transient_one(e: BaseException) -> bool:
    if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
        return True
    if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        msg = str(e).lower()
        if "sqlite" in type(getattr(e, "orig", e)).__module__ or "sqlite" in msg:
            return "locked" in msg or "busy" in msg
        return True  # PostgreSQL/MySQL OperationalError: connection refused, closed, terminated
    if isinstance(e, sqlalchemy.exc.TimeoutError):  # connection pool exhausted for a while
        return True
    if isinstance(e, sqlalchemy.exc.PendingRollbackError):  # a session the lost connection broke
        return True
    return False


# A store that cannot be reached at all when first opened is a wrong URL, a server that is not
# up, or bad credentials: the user hears it at once instead of after minutes of retries.
_CANNOT_CONNECT = ("could not connect", "connection refused", "connection failed",
                   "could not translate host", "authentication failed", "does not exist",
                   "no password supplied", "timeout expired", "name or service not known")


def is_dropped(e: BaseException) -> bool:
    """Transient, and not a failure to connect at all: for opening a store."""
    text, c = "", e
    for _ in range(5):  # the whole chain of causes: Optuna may have wrapped the driver's error
        if c is None:
            break
        text, c = text + " " + str(c).lower(), c.__cause__ or c.__context__
    return is_transient(e) and not any(m in text for m in _CANNOT_CONNECT)


def tracking_transient(e: BaseException) -> bool:
    """A tracking fault worth waiting out: server unreachable or overloaded, SQLite locked."""
    msg = str(e)
    return (type(e).__name__ in ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout")
            or ("API request to" in msg and "failed" in msg)  # MLflow's REST client, retries spent
            or "database is locked" in msg)


def is_outage(e: BaseException) -> bool:
    """The stores failed (retries spent), not the run: a storage or tracking outage."""
    return is_transient(e) or tracking_transient(e)


def root_cause(e: BaseException) -> str:
    """The driver's own words (Optuna's wrapper blames 'invalid data' for a dropped connection)."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    cause = next((c for c in chain if _is_transient_one(c)), e)
    text = str(getattr(cause, "orig", None) or cause).strip()
    return f"{type(getattr(cause, 'orig', None) or cause).__name__}: " + (
        text.splitlines()[0][:160] if text else "")


# ------------------------------------------------------------------------------ the loop
def _backoff(state: tenacity.RetryCallState) -> float:
    """0.2 s, 0.4 s, ... capped at 10 s, times a random 0.75..1.25."""
    return min(0.2 * 2 ** (state.attempt_number - 1), 10.0) * random.uniform(0.75, 1.25)


def with_retry(fn: Callable[[], T], what: str, budget_s: Optional[float] = None,
               on_retry: Optional[Callable[[BaseException], None]] = None,
               transient: Callable[[BaseException], bool] = is_transient,
               label: str = "storage") -> T:
    """Call fn; on a transient fault wait (see `_backoff`) and retry until `budget_s` (default
    CHORUS_STORAGE_RETRY_S) would be passed by the next wait, then re-raise the last fault as it
    was. Any other error is raised at once. `on_retry(e)` runs before each wait; the first retry
    and every fifth are printed to stderr, one line each."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        e, n = state.outcome.exception(), state.attempt_number  # type: ignore[union-attr]
        if on_retry:
            on_retry(e)
        if n == 1 or n % 5 == 0:
            print(f"{label}: {what} failed ({root_cause(e)}); retrying (attempt {n + 1})",
                  file=sys.stderr, flush=True)

    return tenacity.Retrying(
        # Exceptions only: a KeyboardInterrupt (or SIGTERM's exit) raised while SQLAlchemy was
        # handling a lost connection carries that error as its context, and must still stop us.
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, Exception) and transient(e)),
        wait=_backoff,
        stop=tenacity.stop_before_delay(retry_budget_s() if budget_s is None else budget_s),
        before_sleep=before_sleep,
        reraise=True,
    )(fn)
