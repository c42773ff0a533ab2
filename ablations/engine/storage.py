"""The Optuna storage under many workers: heartbeats, retries on transient faults, an atomic queue.

Nothing here is a scheduler: the queue is Optuna's own (WAITING trials in the study's RDB) and
the engine is SQLite on one machine or PostgreSQL/MySQL shared by many. What this adds:

  * `RetryingRDBStorage`: every storage call is retried with exponential backoff on a transient
    fault (SQLite "database is locked", a dropped PostgreSQL connection, a server restart) for up
    to CHORUS_STORAGE_RETRY_S seconds (the loop and the classifier: ablations/tracking/retry.py). The two writes that are not idempotent are made safe to
    repeat: a trial whose enqueue may already have committed is found by its `enqueue_id`
    instead of being created twice, and a state change that already committed is recognised.
    A store that cannot be reached when first opened (wrong URL, server down, bad password) is
    *not* retried: the user gets a one-line error at once.
  * `queue_lock`: popping a trial and checking it is not already done, and reconciling the
    queue, happen under one lock per study: a file lock beside an SQLite database (a
    single-machine store), a PostgreSQL advisory lock otherwise, so it spans machines.
  * `stale_trials`: RUNNING trials whose worker stopped beating (SIGKILL, OOM, a lost machine),
    annotated with why before they are failed, so the next worker or launch re-queues them.
  * `RetryingRDBStorage.enqueue_trials`: many runs queued in one transaction. Optuna's
    `Study.enqueue_trial` is one transaction and ~10 queries per trial (20-30 ms each on SQLite:
    50 minutes of silence for a 150 000-run design); this writes the same rows in bulk
    (benchmarks/queue_throughput.py).
  * `waiting_trial_ids`, `trial_states_by_user_attr`, `finished_trial_ids`: what a claim and the
    progress poller need, each by one query. Optuna's get_all_trials re-reads every unfinished
    trial on each call (its cache keeps finished ones only): seconds per call with thousands of
    runs queued. `adopt_trial` tells Optuna's cache about a trial claimed that way.
    These and enqueue_trials are the one place that reads Optuna's tables (its SQLAlchemy
    models) and its cache's internals directly; tests/engine/test_storage.py checks them against
    Optuna's own calls.

Heartbeat timing is read from the environment when a storage is opened (integers, seconds):
CHORUS_HEARTBEAT_S (default 10) and CHORUS_GRACE_S (default 60; a trial whose last beat is
older is stale). Keep the grace well above the heartbeat and above clock hiccups: a trial
wrongly declared stale is re-run (and the analysis still counts it once).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
from typing import Any, Callable, Iterator, Optional

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # enqueue_trials only (the tables Optuna itself writes)
from optuna.trial import FrozenTrial, TrialState

# The retry loop and error classes: ablations/tracking/retry.py (the MLflow tracker shares them).
from ablations.tracking.retry import (StoreError, env_seconds, is_dropped, retry_budget_s,
                             tracking_retry_budget_s, with_retry)


def heartbeat_s() -> int:
    return env_seconds("CHORUS_HEARTBEAT_S", 10)


def grace_s() -> int:
    return env_seconds("CHORUS_GRACE_S", 60)


def safe_url(url: str) -> str:
    """The URL with any password masked: for messages, hints and MLflow tags."""
    try:
        if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
            if url.startswith(("http://", "https://")):
                scheme, rest = url.split("://", 1)
                cred, host = rest.split("@", 1)
                return f"{scheme}://{cred.split(':', 1)[0]}{':***' if ':' in cred else ''}@{host}"
            return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL we can parse: shown as given
        pass
    return url


_IDEMPOTENT = (  # reads, and writes that set a value (repeating them is harmless)
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_all_studies", "set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "get_best_trial",
    "get_n_trials", "record_heartbeat", "_get_stale_trial_ids",
    # what Optuna's cache in front of every RDBStorage calls instead of the public methods
    "_set_trial_param", "_get_trials", "_get_best_trial_id",
)


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDBStorage whose calls survive transient faults (see the module docstring)."""

    retries = 0  # transient faults retried by this process (for tests and benchmarks)

    def _count(self, e: BaseException) -> None:
        RetryingRDBStorage.retries += 1
        # Start the retry clean: this thread's session may hold a transaction on the dead
        # connection ("Can't reconnect until invalid transaction is rolled back"), and the pool
        # may hold more dead connections.
        with contextlib.suppress(Exception):
            self.scoped_session.remove()
        with contextlib.suppress(Exception):
            self.engine.dispose()

    def _create_new_trial(self, study_id: int,
                          template_trial: Optional[FrozenTrial] = None) -> FrozenTrial:
        # (create_new_trial and Optuna's cache both come through here)
        tag = template_trial.user_attrs.get("enqueue_id") if template_trial is not None else None
        tried = False

        def once() -> FrozenTrial:
            nonlocal tried
            if tried and tag:  # the last try may have committed before the connection dropped
                for t in RDBStorage.get_all_trials(self, study_id, deepcopy=False,
                                                   states=(TrialState.WAITING,)):
                    if t.user_attrs.get("enqueue_id") == tag:
                        return t
            tried = True
            return RDBStorage._create_new_trial(self, study_id, template_trial)

        return with_retry(once, "create trial", on_retry=self._count)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Optional[Any] = None) -> bool:
        tried = False

        def once() -> bool:
            nonlocal tried
            again, tried = tried, True
            try:
                ok = RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # Repeating a tell (COMPLETE/FAIL) that committed before the fault: already done.
                if again and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise
            # Repeating a pop (WAITING -> RUNNING) that committed: the trial is RUNNING now. (It
            # may be another worker's pop if the fault also dropped queue_lock's connection; the
            # queue's claims use pop_trial, which can tell. This path is Optuna's own pop, in
            # study.ask for search designs.)
            if not ok and again and state == TrialState.RUNNING:
                return RDBStorage.get_trial(self, trial_id).state == TrialState.RUNNING
            return ok

        return with_retry(once, "update trial state", on_retry=self._count)

    def pop_trial(self, trial_id: int, token: str) -> bool:
        """WAITING -> RUNNING for one trial, as Optuna's pop does, with `token` (unique to this
        claim) written as the trial's system attribute `claim` in the same transaction. Returns
        whether this call popped it.

        A retry after a fault that may have committed cannot trust "it is RUNNING now, so it was
        my pop": the fault that dropped this connection (a server restart, a network drop) also
        dropped the one holding queue_lock, so another worker may have popped the trial between
        the two tries, and both would run it. The token tells: it is this claim's only if this
        call's transaction committed."""
        attr = models.TrialSystemAttributeModel
        value = json.dumps(token)
        tried = False

        def once() -> bool:
            nonlocal tried
            again, tried = tried, True
            with sqlalchemy.orm.Session(self.engine) as session, session.begin():
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                if trial.state != TrialState.WAITING:
                    return again and trial.state == TrialState.RUNNING and session.scalar(
                        sqlalchemy.select(attr.value_json).where(
                            attr.trial_id == trial_id, attr.key == "claim")) == value
                trial.state = TrialState.RUNNING
                trial.datetime_start = datetime.datetime.now()  # (as Optuna's pop)
                session.execute(sqlalchemy.delete(attr).where(attr.trial_id == trial_id,
                                                              attr.key == "claim"))
                session.add(attr(trial_id=trial_id, key="claim", value_json=value))
            return True

        return with_retry(once, "claim a trial", on_retry=self._count)

    def enqueue_trials(self, study_id: int, trials: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
        """Queue WAITING trials, one per (fixed params, user attrs), in one transaction.

        The rows are those `Study.enqueue_trial(params, user_attrs=...)` writes: a WAITING trial
        numbered after the study's last one, a system attribute `fixed_params`, the user
        attributes (JSON, as Optuna stores them); tests/engine/test_storage.py compares the two. The
        study's row is locked FOR UPDATE as Optuna does when it numbers a new trial, so numbers
        stay unique beside other writers (PostgreSQL; SQLite allows one writer at a time).
        All or nothing: a retry after a fault that may have committed first looks for the first
        trial's `enqueue_id`. Returns how many trials were queued."""
        if not trials:
            return 0
        tag = trials[0][1].get("enqueue_id")
        tried = False

        def has_tag(session: sqlalchemy.orm.Session) -> bool:
            attr, trial = models.TrialUserAttributeModel, models.TrialModel
            return session.execute(
                sqlalchemy.select(attr.trial_id).join(trial, trial.trial_id == attr.trial_id)
                .where(trial.study_id == study_id, attr.key == "enqueue_id",
                       attr.value_json == json.dumps(tag)).limit(1)).first() is not None

        def once() -> int:
            nonlocal tried
            again, tried = tried, True
            with sqlalchemy.orm.Session(self.engine) as session, session.begin():
                if again and tag and has_tag(session):
                    return len(trials)  # the previous try committed them
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                first = session.scalar(sqlalchemy.select(sqlalchemy.func.count(
                    models.TrialModel.trial_id)).where(models.TrialModel.study_id == study_id))
                ids = self._insert_trials(session, [
                    {"study_id": study_id, "number": first + i, "state": TrialState.WAITING}
                    for i in range(len(trials))])
                session.execute(sqlalchemy.insert(models.TrialSystemAttributeModel), [
                    {"trial_id": tid, "key": "fixed_params", "value_json": json.dumps(params)}
                    for tid, (params, _) in zip(ids, trials)])
                rows = [{"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                        for tid, (_, attrs) in zip(ids, trials) for k, v in attrs.items()]
                if rows:
                    session.execute(sqlalchemy.insert(models.TrialUserAttributeModel), rows)
            return len(trials)

        return with_retry(once, "enqueue trials", on_retry=self._count)

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes of a running trial in one transaction: a finished run writes
        ~30 (its outcome), and on SQLite each separate write is a commit of its own (~2.5 ms:
        about a second of the 18-run main job; benchmarks/main_job.py). Optuna's own upsert per
        attribute, so a retry after a commit that did happen rewrites the same values."""
        upsert = getattr(self, "_set_trial_attr_without_commit", None)
        if upsert is None:  # (an Optuna without it: one write each, as Trial.set_user_attr does)
            for k, v in attrs.items():
                self.set_trial_user_attr(trial_id, k, v)
            return

        def once() -> None:
            with sqlalchemy.orm.Session(self.engine) as session, session.begin():
                for k, v in attrs.items():
                    upsert(session, models.TrialUserAttributeModel, trial_id, k, v)

        with_retry(once, "set trial user attrs", on_retry=self._count)

    def _insert_trials(self, session: sqlalchemy.orm.Session, rows: list[dict[str, Any]]) -> list[int]:
        """Insert trial rows; their new ids in order (one statement where the driver can)."""
        table = models.TrialModel
        if getattr(self.engine.dialect, "insert_executemany_returning_sort_by_parameter_order",
                   False):  # (SQLAlchemy >= 2.0 on SQLite >= 3.35 and PostgreSQL)
            return list(session.scalars(sqlalchemy.insert(table).returning(
                table.trial_id, sort_by_parameter_order=True), rows))
        return [session.execute(sqlalchemy.insert(table).values(**row)).inserted_primary_key[0]
                for row in rows]  # (MySQL: no RETURNING; still one transaction)


def _retrying(name: str) -> Callable[..., Any]:
    base = getattr(RDBStorage, name)

    @functools.wraps(base)
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return with_retry(lambda: base(self, *args, **kwargs), name.strip("_").replace("_", " "),
                          on_retry=self._count)

    return call


for _name in _IDEMPOTENT:
    if hasattr(RDBStorage, _name):
        setattr(RetryingRDBStorage, _name, _retrying(_name))


def open_storage(url: str) -> RetryingRDBStorage:
    """Optuna storage with heartbeats (stale-trial detection), patient locking and retries."""
    if url.startswith("sqlite:"):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    elif url.startswith(("postgresql", "mysql")):
        # pre-ping: a pooled connection that died (server restart, idle timeout) is replaced
        # before use instead of failing the first query after it
        kwargs = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": 10}
    else:
        raise StoreError(f"--storage {url!r}: use sqlite:///PATH, postgresql://... or mysql://...")
    hb, grace = heartbeat_s(), grace_s()
    retry_budget_s(), tracking_retry_budget_s()  # bad values: an error now
    return with_retry(lambda: RetryingRDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=hb,
                                                 grace_period=grace),
                      "open the storage", transient=is_dropped)


# Optuna keeps a Study's storage and id, and a Trial's id, private; the queue needs them. Every
# private Optuna name this project uses is in this module (and these three are read only here).
def handles(study: optuna.Study) -> tuple[optuna.storages.BaseStorage, int]:
    """The storage behind a study (Optuna's cache in front of the RDB) and the study's id."""
    return study._storage, study._study_id


def trial_id_of(trial: optuna.Trial) -> int:
    return trial._trial_id


def rdb(storage: optuna.storages.BaseStorage) -> RDBStorage:
    """The RDBStorage behind a study's storage (Optuna wraps it in a cache)."""
    return getattr(storage, "_backend", storage)  # type: ignore[return-value]


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """trial.set_user_attr for each of `attrs`, in one transaction where the storage can."""
    backend = rdb(trial.storage)
    if isinstance(backend, RetryingRDBStorage):
        backend.set_trial_user_attrs(trial_id_of(trial), attrs)
    else:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)


def waiting_trial_ids(storage: optuna.storages.BaseStorage, study_id: int,
                      limit: int = 20) -> list[int]:
    """The oldest WAITING trials' ids, first in first out (Optuna's pop order). One indexed query:
    Optuna's get_all_trials re-reads every unfinished trial on each call, ~5 s with 10 000 runs
    queued, which a worker paid twice per claim."""
    trial = models.TrialModel

    def read() -> list[int]:
        with sqlalchemy.orm.Session(rdb(storage).engine) as session:
            return list(session.scalars(sqlalchemy.select(trial.trial_id).where(
                trial.study_id == study_id, trial.state == TrialState.WAITING)
                .order_by(trial.trial_id).limit(limit)))

    return with_retry(read, "read the queue")


def adopt_trial(storage: optuna.storages.BaseStorage, study_id: int, trial_id: int) -> None:
    """Tell Optuna's cache in front of the storage about a trial claimed by id (waiting_trial_ids)
    so that Trial(study, trial_id) works (its suggest_* looks the trial up there): the same
    bookkeeping the cache does for a trial it creates, plus "re-read it on every read until it
    is finished", so its cached copy never goes stale. Without the cache internals this Optuna
    version has, fall back to reading every trial (correct, slower with big queues)."""
    backend = rdb(storage)
    if storage is backend:
        return
    try:
        from optuna.storages._cached_storage import _StudyInfo

        frozen = backend.get_trial(trial_id)
        with storage._lock:  # type: ignore[attr-defined]
            info = storage._studies.setdefault(study_id, _StudyInfo())  # type: ignore[attr-defined]
            storage._add_trials_to_cache(study_id, [frozen])  # type: ignore[attr-defined]
            info.unfinished_trial_ids.add(trial_id)
    except (ImportError, AttributeError):
        storage.get_all_trials(study_id, deepcopy=False)


def finished_trial_ids(storage: optuna.storages.BaseStorage, study_id: int) -> list[int]:
    """Ids of the study's COMPLETE and FAIL trials, by one query (see waiting_trial_ids)."""
    trial = models.TrialModel

    def read() -> list[int]:
        with sqlalchemy.orm.Session(rdb(storage).engine) as session:
            return list(session.scalars(sqlalchemy.select(trial.trial_id).where(
                trial.study_id == study_id,
                trial.state.in_([TrialState.COMPLETE, TrialState.FAIL])).order_by(trial.trial_id)))

    return with_retry(read, "read finished trials")


def trial_states_by_user_attr(storage: optuna.storages.BaseStorage, study_id: int, key: str,
                              value: Any) -> dict[int, TrialState]:
    """{trial id: state} of the study's trials whose user attribute `key` is `value` (e.g. the
    trials of one run key), without reading every trial."""
    attr, trial = models.TrialUserAttributeModel, models.TrialModel

    def read() -> dict[int, TrialState]:
        with sqlalchemy.orm.Session(rdb(storage).engine) as session:
            return dict(session.execute(sqlalchemy.select(trial.trial_id, trial.state)
                                        .join(attr, attr.trial_id == trial.trial_id)
                                        .where(trial.study_id == study_id, attr.key == key,
                                               attr.value_json == json.dumps(value))).all())

    return with_retry(read, "read a run's trials")


# --------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def queue_lock(storage: optuna.storages.BaseStorage, study_name: str) -> Iterator[None]:
    """One holder at a time per study, across processes (SQLite) or machines (PostgreSQL).

    Optuna pops with SELECT ... FOR UPDATE, which SQLite ignores: two processes can claim the
    same waiting trial (measured: 2 workers ran 1 of 8 runs twice). And "pop, then check the run
    is not done or running elsewhere" and "find missing runs, enqueue them" must not interleave
    between workers. SQLite: a file lock beside the database. PostgreSQL: a session advisory lock
    keyed by the study name. MySQL: GET_LOCK.
    """
    storage = rdb(storage)
    url = str(storage.engine.url)
    if url.startswith("sqlite:///"):
        with open(storage.engine.url.database + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    if url.startswith("postgresql"):
        take, give = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
    elif url.startswith("mysql"):
        take, give = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"
        key = f"chorus:{key}"  # type: ignore[assignment]
    else:  # pragma: no cover - open_storage allows nothing else
        yield
        return

    def acquire() -> sqlalchemy.engine.Connection:
        conn = storage.engine.connect()
        try:
            conn.execute(sqlalchemy.text(take), {"k": key})
            conn.commit()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        return conn

    conn = with_retry(acquire, "take the queue lock")
    try:
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text(give), {"k": key})
            conn.commit()
            conn.close()
        except Exception:  # noqa: BLE001 - a dropped connection released the lock already
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()


# --------------------------------------------------------------------------- stale trials
def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Fail the RUNNING trials whose heartbeat is older than the grace period; return them.

    Like optuna.storages.fail_stale_trials, but each is annotated first (a finished trial's
    attributes can no longer be set): `error` says why, so `status` and the trial list show it.
    """
    cached, study_id = handles(study)
    storage = rdb(cached)
    if not isinstance(storage, RDBStorage) or storage.heartbeat_interval is None:
        return []
    failed = []
    for trial_id in storage._get_stale_trial_ids(study_id):
        try:
            storage.set_trial_user_attr(trial_id, "error", (
                f"worker lost: no heartbeat for over {storage.grace_period} s (killed, out of "
                f"memory, or its machine or network went away)"))
            storage.set_trial_user_attr(trial_id, "lost", True)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(storage.get_trial(trial_id))
        except UpdateFinishedTrialError:  # another worker failed it first (or it just finished)
            continue
    return failed
