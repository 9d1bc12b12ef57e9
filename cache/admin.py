"""``gpserve cache stats|clear``: look at and empty row caches (run while no server uses them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb

from . import integrity
from .environment import environment_stats, open_environment
from .store import GENERATIONS


def environments(cache_dir: str) -> list[Path]:
    root = Path(cache_dir)
    return sorted(p for p in root.iterdir() if (p / "data.mdb").exists()) if root.is_dir() else []


def show(cache_dir: str) -> int:
    envs = environments(cache_dir)
    if not envs:
        print(f"no row caches in {cache_dir}")
        return 0
    for path in envs:
        try:
            info = stats(path)
        except lmdb.Error as e:
            info = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"model": path.name, "path": str(path), **info}))
    return 0


def clear(cache_dir: str, model: str | None) -> int:
    envs = [p for p in environments(cache_dir) if model is None or p.name.startswith(f"{model}-")]
    for path in envs:
        shutil.rmtree(path)
        print(f"removed {path}")
    if not envs:
        print(f"nothing to remove in {cache_dir}")
    return 0


def stats(path: Path) -> dict:
    """Entries and sizes of one environment, opened read-only (``gpserve cache stats``);
    a file LMDB cannot map safely is reported, not opened."""
    why = integrity.damage(path)
    if why is not None:
        return {"damaged": why}
    file_mb = ((Path(path) / "data.mdb").stat().st_size >> 20) + 1
    env = open_environment(path, file_mb, readonly=True)   # a map at least the file's size
    try:
        dbs = []
        for name in GENERATIONS:
            try:
                dbs.append(env.open_db(name, create=False))
            except lmdb.NotFoundError:
                pass
        return environment_stats(env, dbs)
    finally:
        env.close()
