"""A damaged cache file, through real servers: a row whose bytes changed on disk is a
miss (computed again), never a wrong answer; a file cut short is moved aside before any
front maps it, and the server serves with a fresh cache instead of dying of SIGBUS."""
import os

import numpy as np
from test_cache_store import damage_value

from gpserve.client import Client
from gpserve.testing import Server, eventually

ROWS = np.random.default_rng(7).standard_normal((192, 16)).astype(np.float32)


def serve(cache_dir):
    return Server("--model", "echo", "--cache", "--cache-dir", str(cache_dir))


def ask_all(server) -> None:
    """Every row, 16 to a request: echo's right answer is the input itself."""
    with Client(server.url) as c:
        for start in range(0, len(ROWS), 16):
            np.testing.assert_array_equal(c.execute(ROWS[start:start + 16]),
                                          ROWS[start:start + 16])


def environment(cache_dir):
    (env,) = [p for p in cache_dir.iterdir() if (p / "data.mdb").exists()
              and ".damaged-" not in p.name]
    return env


def test_damaged_rows_are_misses_and_a_cut_file_is_moved_aside(tmp_path):
    cache_dir = tmp_path / "cache"
    with serve(cache_dir) as s:
        ask_all(s)
        eventually(lambda: s.info()["cache"]["writes"] >= len(ROWS), what="rows written")
    env = environment(cache_dir)
    damaged = sum(damage_value(env, ROWS[i].tobytes()) for i in range(0, 192, 24))
    assert damaged >= 8          # the live copy of each, and stale copies in freed pages
    with serve(cache_dir) as s:
        ask_all(s)                                     # all right: 8 computed again
        info = s.info()["cache"]
        assert info["corrupt"] == 8 and info["hits"] == len(ROWS) - 8
        assert s.metric("gpserve_cache_corrupt_rows_total") == 8
        assert s.output().count("failed its checksum") >= 1
        eventually(lambda: s.info()["cache"]["writes"] >= 8, what="the rows rewritten")
    with serve(cache_dir) as s:
        ask_all(s)
        assert s.info()["cache"]["corrupt"] == 0      # rewritten: trusted again
        assert s.info()["cache"]["hits"] == len(ROWS)

    for size in (lambda n: n // 2, lambda n: 8192):   # half the file; the meta pages alone
        data = environment(cache_dir) / "data.mdb"
        os.truncate(data, size(data.stat().st_size))
        with serve(cache_dir) as s:                   # ready, and no front restarted
            ask_all(s)
            assert s.info()["stats"]["front_restarts"] == 0
            assert "moved aside to" in s.output() and str(cache_dir) in s.output()
            assert s.info()["cache"]["enabled"]
    aside = sorted(p.name for p in cache_dir.iterdir() if ".damaged-" in p.name)
    assert len(aside) == 2, aside
