"""The retry loop shared by the Optuna storage and the MLflow tracking store (ablations/tracking/retry.py)."""

from __future__ import annotations

import sqlite3
import time

import pytest
import sqlalchemy.exc

from ablations.tracking import retry


def locked() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("UPDATE x", {}, sqlite3.OperationalError("database is locked"))


@pytest.fixture
def sleeps(monkeypatch):
    """The waits the loop asked for, without waiting."""
    asked: list[float] = []
    monkeypatch.setattr(time, "sleep", asked.append)
    return asked


def flaky(faults: list[BaseException]):
    calls = []

    def fn():
        calls.append(1)
        if faults:
            raise faults.pop(0)
        return "ok"

    return fn, calls


def test_transient_faults_are_retried_with_doubling_jittered_waits(sleeps, capsys):
    fn, calls = flaky([locked() for _ in range(6)])
    seen = []
    assert retry.with_retry(fn, "read the queue", budget_s=60, on_retry=seen.append) == "ok"
    assert len(calls) == 7 and len(seen) == 6 and len(sleeps) == 6
    for i, s in enumerate(sleeps):  # 0.2, 0.4, 0.8, ... each within +-25 %
        assert 0.75 * 0.2 * 2 ** i <= s <= 1.25 * 0.2 * 2 ** i
    lines = capsys.readouterr().err.splitlines()
    # the first retry and every fifth are printed, with the driver's own words
    assert lines == ["storage: read the queue failed (OperationalError: database is locked); "
                     "retrying (attempt 2)",
                     "storage: read the queue failed (OperationalError: database is locked); "
                     "retrying (attempt 6)"]


def test_waits_are_capped_at_ten_seconds(sleeps):
    fn, _ = flaky([locked() for _ in range(9)])
    retry.with_retry(fn, "x", budget_s=10_000)
    assert max(sleeps) <= 12.5 and min(sleeps[-2:]) >= 7.5


def test_other_errors_are_raised_at_once(sleeps):
    fn, calls = flaky([ValueError("bad")])
    with pytest.raises(ValueError, match="bad"):
        retry.with_retry(fn, "x", budget_s=60)
    assert len(calls) == 1 and sleeps == []


def test_an_interrupt_is_never_retried_even_with_a_transient_fault_as_its_context(sleeps):
    def fn():
        try:
            raise locked()
        except sqlalchemy.exc.OperationalError:
            raise KeyboardInterrupt  # Ctrl-C while the driver handled the fault

    with pytest.raises(KeyboardInterrupt):
        retry.with_retry(fn, "x", budget_s=60)
    assert sleeps == []


def test_the_last_fault_is_raised_as_it_was_once_the_budget_is_spent():
    faults = [locked() for _ in range(100)]
    last = []
    t0 = time.monotonic()

    def fn():
        last.append(faults.pop(0))
        raise last[-1]

    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        # (real waits) ~0.2 s waited + ~0.4 s to wait > 0.4 s: one retry, then give up
        retry.with_retry(fn, "x", budget_s=0.4)
    assert info.value is last[-1] and len(last) == 2 and time.monotonic() - t0 < 5


def test_the_tracking_store_uses_its_own_classifier_and_label(sleeps, capsys):
    class ConnectionError(Exception):  # what requests raises, by name
        pass

    dropped = sqlalchemy.exc.OperationalError("x", {}, Exception("server closed the connection"))
    assert retry.is_transient(dropped)
    fn, calls = flaky([ConnectionError("refused"), dropped])
    with pytest.raises(sqlalchemy.exc.OperationalError):  # a storage fault, not a tracking one
        retry.with_retry(fn, "log params", 60, transient=retry.tracking_transient, label="tracking")
    assert len(calls) == 2
    assert capsys.readouterr().err.startswith("tracking: log params failed (ConnectionError: refused)")


def test_budgets_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHORUS_TRACKING_RETRY_S", "7")
    monkeypatch.setenv("CHORUS_STORAGE_RETRY_S", "-1")
    assert retry.tracking_retry_budget_s() == 7
    with pytest.raises(retry.StoreError, match=r"CHORUS_STORAGE_RETRY_S='-1': must be a whole"):
        retry.retry_budget_s()


def test_an_outage_is_a_transient_fault_of_either_store():
    assert retry.is_outage(locked()) and not retry.is_outage(ValueError("x"))
    assert retry.is_outage(RuntimeError("API request to http://h/api failed with exception"))
