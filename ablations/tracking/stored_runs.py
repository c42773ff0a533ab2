"""The finished runs of every study in an MLflow store, for `runner.py plan` (its wall time and
seed spread come from earlier runs of the same recipes).

Reading the tracking store: an SQLite store (MLflow's default, `sqlite:///mlflow.db`) is read
with the standard library's sqlite3, read-only. Why not MlflowClient: importing MLflow costs
seconds (this command should answer at once), and opening a store through MLflow runs its
schema migrations, i.e. writes to (or creates) a database that a planning command should only
read. Other stores (an MLflow server, PostgreSQL) go through MlflowClient, imported only then.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from ablations.tracking.names import OUTCOME_PREFIXES, outcomes


@dataclass
class StoredRun:
    params: dict[str, str]
    status: str
    metrics: dict[str, float]
    start_time: int


def param_str(v: Any) -> str:
    """A config value as tracking.start_child logs it."""
    return json.dumps(v) if isinstance(v, (list, tuple)) else str(v)


def read_runs(tracking_uri: str, limit: int = 5000) -> tuple[list[StoredRun], str]:
    """Finished runs of every study in the store, newest first, and a note on where from."""
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        if not os.path.exists(path):
            return [], f"no tracking store at {path}"
        return _read_sqlite(path, limit), tracking_uri
    if urlparse(tracking_uri).scheme in ("", "file") and not os.path.exists(
            urlparse(tracking_uri).path or tracking_uri):
        return [], f"no tracking store at {tracking_uri}"
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.request

        try:  # MLflow's client retries a dead server for minutes: probe it once, briefly
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5):
                pass
        except OSError as e:
            return [], f"{tracking_uri} (not reachable: {type(e).__name__})"
    return _read_mlflow(tracking_uri, limit), tracking_uri


def _read_sqlite(path: str, limit: int) -> list[StoredRun]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ids = [r[0] for r in con.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'kind' AND t.value = 'run' AND r.status = 'FINISHED' "
            "AND r.lifecycle_stage = 'active' ORDER BY r.start_time DESC LIMIT ?", (limit,))]
        out = {i: StoredRun({}, "", {}, 0) for i in ids}
        # the outcome metrics under every prefix a store may hold (names.OUTCOME_PREFIXES); LIKE's
        # wildcards are `%` and `_`, neither of which a prefix contains
        patterns = [p + "%" for p in OUTCOME_PREFIXES]
        likes = " OR ".join("key LIKE ?" for _ in patterns)
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            q = ",".join("?" * len(part))
            for rid, k, v in con.execute(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({q})", part):
                out[rid].params[k] = v
            for rid, v in con.execute(f"SELECT run_uuid, value FROM tags WHERE key = 'status' AND run_uuid IN ({q})", part):
                out[rid].status = v
            raw: dict[str, dict[str, float]] = {i: {} for i in part}
            for rid, k, v in con.execute(f"SELECT run_uuid, key, value FROM latest_metrics WHERE ({likes}) AND run_uuid IN ({q})", [*patterns, *part]):
                raw[rid][k] = float(v)
            for rid, m in raw.items():
                out[rid].metrics.update(outcomes(m))
            for rid, t in con.execute(f"SELECT run_uuid, start_time FROM runs WHERE run_uuid IN ({q})", part):
                out[rid].start_time = int(t or 0)
    except sqlite3.DatabaseError:
        return []  # not an MLflow store (or an unknown schema): nothing known
    finally:
        con.close()
    return [r for r in out.values() if r.status]


def _read_mlflow(tracking_uri: str, limit: int) -> list[StoredRun]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    runs = client.search_runs(exps, "tags.kind = 'run' and attributes.status = 'FINISHED'",
                              max_results=min(limit, 5000), order_by=["attributes.start_time DESC"])
    return [StoredRun(dict(r.data.params), r.data.tags.get("status", ""),
                      outcomes(r.data.metrics), r.info.start_time)
            for r in runs if r.data.tags.get("status")]
