"""A moved or copied study folder browses again: artifact paths re-pointed into the folder.

MLflow records every experiment's artifact location, and every run's artifact URI, as an
absolute path when a local store creates them (a relative one is resolved against the working
directory first: mlflow.utils.uri.resolve_uri_if_local), and it has no API to change them. A
study folder (mlflow.db + mlruns/) copied to another machine or directory therefore shows the
old paths, and its artifacts (report, curves.csv, figures) break once the original is gone.

`relocate(db)` re-points them: for each experiment whose recorded location is a local path
outside the database's folder, it looks for the same trailing path inside that folder (for
`/old/place/mlruns/1`: `mlruns/1`, then `1`), and where that folder exists it rewrites the
experiment's location and the prefix of its runs' URIs, in one transaction. Anything else
(S3, `mlflow-artifacts:` on a server, a location that is already inside the folder, a folder
that is not there) is left alone. `runner.py ui` does it before serving an SQLite store.

It writes MLflow's own tables (`experiments.artifact_location`, `runs.artifact_uri`, stable
since MLflow 1.x) with sqlite3, as `runner.py plan` reads them: MLflow offers no call for it.
A tracking server needs none of this: its `--artifacts-destination` is a server flag, so a
moved folder is served by starting the server with the new path.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path
from typing import Optional


def _local_path(location: str) -> Optional[Path]:
    """The filesystem path of a local artifact location (`/x` or `file:///x`), else None."""
    if location.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _new_location(old: Path, folder: Path) -> Optional[Path]:
    """The same trailing path inside folder, longest first (`mlruns/1` before `1`)."""
    parts = old.parts[1:]
    for i in range(len(parts)):
        candidate = folder.joinpath(*parts[i:])
        if candidate.is_dir():
            return candidate
    return None


def relocate(db_path: str) -> list[tuple[str, str, str]]:
    """Re-point the artifact locations of an SQLite tracking store into its own folder (see the
    module docstring); returns (experiment id, old location, new location) of each change."""
    folder = Path(db_path).resolve().parent
    changes = []
    if not Path(db_path).is_file():
        return changes  # (connecting would create an empty database file)
    con = sqlite3.connect(db_path)
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                       "'experiments'").fetchone() is None:
            return changes  # a store MLflow has not set up yet: nothing points anywhere
        with con:  # one transaction: all or nothing
            rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
            for eid, loc in rows:
                old = _local_path(loc or "")
                if old is None or _inside(old, folder):
                    continue
                new = _new_location(old, folder)
                if new is None:
                    continue
                new_loc = new.as_uri() if loc.startswith("file://") else str(new)
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                            (new_loc, eid))
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                            "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                            (new_loc, len(loc) + 1, eid, len(loc), loc))
                changes.append((str(eid), loc, new_loc))
    finally:
        con.close()
    return changes
