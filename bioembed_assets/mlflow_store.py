"""The embedded MLflow store (sqlite + a local artifact folder): created inside the home, and moveable.

MLflow records absolute artifact locations (experiments, runs, logged models, model versions) and
dataset sources. `prepare_embedded_store` creates a new store with the configured artifact root as
the location of every experiment, the Default one included (MLflow would otherwise record the
working directory), and, when it finds a store whose recorded artifact root is not the configured
one (a home moved, copied or mounted elsewhere), rewrites those recorded prefixes in one
transaction, so models load and new runs write under the home's current location.
"""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from bioembed_assets.store.atomic import atomic_create

ARTIFACT_ROOT_HINT = "BIOEMBED_ARTIFACT_ROOT to where the artifacts are"

# (table, column) of MLflow's sqlite schema that hold an artifact URI.
_URI_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for any other backend)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(unquote(tracking_uri[len("sqlite:///"):])).absolute()


def _as_path(location: str) -> str:
    return unquote(urlparse(location).path) if location.startswith("file:") else location


def _recorded_root(con: sqlite3.Connection) -> tuple[str, str] | None:
    """The artifact root the store was made with: where experiment `<name>` lives is `<root>/<name>`
    for bioembed's experiments, `<root>/0` for Default. Returns (root, one experiment's name)."""
    for exp_id, name, location in con.execute("SELECT experiment_id, name, artifact_location FROM experiments"):
        path = _as_path(location or "")
        leaf = "0" if str(exp_id) == "0" else name
        if path.endswith(f"/{leaf}") and name != "Default":
            return path[: -len(leaf) - 1], name
    return None


def _relocate(con: sqlite3.Connection, old_root: str, new_root: Path) -> int:
    """Rewrite every recorded artifact location under `old_root` (as URI or path) to `new_root`;
    dataset sources under the old home likewise. Returns the rows changed."""
    changed = 0
    pairs = [(Path(old_root).as_uri(), new_root.as_uri()), (old_root, str(new_root))]
    for table, column in _URI_COLUMNS:
        for old, new in pairs:
            cur = con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # fixed table/column names
                              f"WHERE substr({column}, 1, ?) = ?", (new, len(old) + 1, len(old) + 1, old + "/"))
            changed += cur.rowcount
    old_home, new_home = str(Path(old_root).parent), str(new_root.parent)
    cur = con.execute("UPDATE datasets SET dataset_source = replace(dataset_source, ?, ?) WHERE instr(dataset_source, ?)",
                      (f'"{old_home}/', f'"{new_home}/', f'"{old_home}/'))
    return changed + cur.rowcount


def _default_under_root(con: sqlite3.Connection, root: Path) -> int:
    """Put a Default experiment recorded outside the root (MLflow's `./mlruns` in whatever folder
    the first process ran in) at `<root>/0`."""
    where = (root / "0").as_uri()
    return con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0 AND artifact_location != ?",
                       (where, where)).rowcount


def _create(db: Path, root: Path) -> None:
    """Make the schema (and Default at `<root>/0`) in a temporary file renamed into place, once: processes
    opening a new home at once neither race MLflow's migrations nor ever see a half-made database."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root.mkdir(parents=True, exist_ok=True)
    with atomic_create(db) as tmp:
        if tmp is not None:
            SqlAlchemyStore(f"sqlite:///{tmp}", root.as_uri()).engine.dispose()


def prepare_embedded_store(tracking_uri: str, artifact_root: str | Path) -> int:
    """Create the sqlite store at `tracking_uri` with `artifact_root`, or relocate an existing one
    made elsewhere; returns the number of recorded locations rewritten (0: nothing to do)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return 0
    root = Path(artifact_root).absolute()
    if not db.exists():
        _create(db, root)
        return 0
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # one relocation even if several processes open the moved home
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        recorded = _recorded_root(con) if "experiments" in tables else None
        changed = 0
        if recorded is not None and Path(recorded[0]) != root:
            if (root / recorded[1]).is_dir():
                changed = _relocate(con, recorded[0], root)
            else:  # the artifacts are not here: leave the records alone rather than point them at nothing
                warnings.warn(f"MLflow store {db} records artifacts under {recorded[0]}, but {root} holds no "
                              f"{recorded[1]!r} folder; not relocating (set {ARTIFACT_ROOT_HINT})", stacklevel=2)
        if "experiments" in tables:
            changed += _default_under_root(con, root)
        con.execute("COMMIT")
        return changed
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()
