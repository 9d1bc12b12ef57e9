"""An LMDB environment of the row cache: where it lives (one per model version), how
it is opened, and what it holds."""
from __future__ import annotations

import os
from pathlib import Path

import lmdb


def environment_path(cache_dir: str, model_name: str, model_path: str) -> Path:
    """One environment per model: named after the model and (a hash of) where it lives."""
    import blake3
    where = blake3.blake3(os.path.abspath(model_path).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{model_name}-{where}"


def open_environment(path: Path, size_mb: int, readonly: bool = False) -> lmdb.Environment:
    if not readonly:
        path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=size_mb << 20, max_dbs=4, subdir=True,
                     readonly=readonly, lock=not readonly, readahead=False, sync=False,
                     metasync=False, max_readers=512, create=not readonly)


def pages(stat) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def environment_stats(env: lmdb.Environment, dbs) -> dict:
    out = {"entries": 0, "used_bytes": 0}
    with env.begin() as txn:
        for db in dbs:
            st = txn.stat(db)
            out["entries"] += st["entries"]
            out["used_bytes"] += pages(st) * st["psize"]
    out["file_bytes"] = (Path(env.path()) / "data.mdb").stat().st_size
    return out
