"""The row cache's shared tier on a real redis-server (Debian's, started by these tests):
two servers sharing it (a row one computed is a hit on the other), over TLS too, Redis
killed and back under load, Redis stalled, a wrong password, a corrupted value."""
import threading

import numpy as np
import pytest
from conftest import Redis, scale_model, tls_files

from gpserve.client import Client
from gpserve.testing import Server, eventually


def serve(model, redis_url: str, tmp_path, name: str, *args: str) -> Server:
    return Server("--model", str(model), "--fronts", "1", "--cache", "--cache-dir",
                  str(tmp_path / name), "--cache-shared", redis_url, *args)


def cache(server: Server) -> dict:
    return server.info()["cache"]


@pytest.fixture
def model(tmp_path):
    return scale_model(tmp_path / "scale.onnx", 3.0)


@pytest.fixture
def replicas(model, tmp_path):
    """A redis-server and two replicas of the model sharing it, each its own LMDB."""
    with Redis() as redis, serve(model, redis.url, tmp_path, "a") as a, \
            serve(model, redis.url, tmp_path, "b") as b:
        yield redis, a, b


def test_a_row_computed_by_one_replica_is_a_hit_on_the_other(replicas):
    redis, a, b = replicas
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    with Client(a.url) as ca, Client(b.url) as cb:
        want = ca.execute(x)
        eventually(lambda: redis.client.dbsize() == 6, what="6 rows in Redis")
        computed = b.rows_computed()
        np.testing.assert_array_equal(cb.execute(x), want)
        assert b.rows_computed() == computed                    # none computed on b
        assert (cache(b)["shared_hits"], cache(b)["shared_misses"]) == (6, 0)
        # found in Redis, written to b's LMDB: next time a local hit
        eventually(lambda: cache(b)["writes"] == 6, what="b's LMDB has the rows")
        np.testing.assert_array_equal(cb.execute(x), want)
        assert cache(b)["hits"] >= 6 and cache(b)["shared_hits"] == 6
    assert b.metric("gpserve_rows_total", source="shared_cache") == 6
    assert cache(b)["shared"]["up"] is True


class NewRows:
    """A client sending rows never seen before, without pause, in a thread."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.answered, self.failures, self.slowest = 0, [], 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time
        rng = np.random.default_rng()
        with Client(self.url) as c:
            while not self.stop.is_set():
                x = rng.random((2, 4), dtype=np.float32)
                started = time.monotonic()
                try:
                    [y] = c.execute_multi([x], ["x"], ["y"])
                    np.testing.assert_allclose(y, x * 3, rtol=1e-6)
                    self.answered += 1
                except Exception as e:
                    self.failures.append(repr(e))
                self.slowest = max(self.slowest, time.monotonic() - started)

    def __enter__(self) -> "NewRows":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def test_redis_killed_under_load_then_back(replicas):
    redis, a, b = replicas
    port = redis.port
    with NewRows(a.url) as load:
        eventually(lambda: load.answered > 50, what="the load running")
        redis.kill()
        answered = load.answered
        eventually(lambda: load.answered > answered + 100, what="answers without Redis")
        assert cache(a)["shared_errors"] >= 1 and cache(a)["shared"]["up"] is False
        with Redis(port):                                   # back, empty
            x = np.full((1, 4), 7.0, np.float32)

            def shared_again() -> bool:         # a row a computes is a hit on b
                x[0, 0] += 1
                with Client(a.url) as ca, Client(b.url) as cb:
                    ca.execute(x)
                    before = cache(b)["shared_hits"]
                    cb.execute(x)
                    return cache(b)["shared_hits"] > before
            eventually(shared_again, 30, "the shared tier back")
    assert load.failures == []
    assert a.metric("gpserve_cache_errors_total", tier="shared") >= 1
    assert "the shared row cache (redis://127.0.0.1" in a.output()


def test_a_stalled_redis_does_not_hold_requests(model, tmp_path):
    with Redis() as redis, serve(model, redis.url, tmp_path, "a",
                                 "--cache-shared-timeout-ms", "20") as a:
        with NewRows(a.url) as load:
            eventually(lambda: load.answered > 20, what="the load running")
            stall = threading.Thread(target=lambda: redis.client.execute_command(
                "DEBUG", "SLEEP", "3"))
            stall.start()
            answered = load.answered
            eventually(lambda: load.answered > answered + 50, 2.5,
                       "answers while Redis sleeps 3 s")
            stall.join()
        assert load.failures == [] and load.slowest < 1.5, load.slowest
        assert cache(a)["shared_errors"] >= 1


def test_a_wrong_password_serves_without_the_tier_and_never_logs_it(model, tmp_path):
    with Redis(None, "--requirepass", "s3cret") as redis:
        url = f"redis://:wrong-one@127.0.0.1:{redis.port}/0"
        with serve(model, url, tmp_path, "a") as a, Client(a.url) as c:
            x = np.ones((2, 4), np.float32)
            np.testing.assert_array_equal(c.execute_multi([x], ["x"], ["y"])[0], x * 3)
            assert cache(a)["shared_errors"] >= 1
            assert "wrong-one" not in a.output() and "redis://***@127.0.0.1" in a.output()
            assert "wrong-one" not in str(a.info())


def test_a_corrupted_value_is_a_miss_computed_and_rewritten(replicas):
    redis, a, b = replicas
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Client(a.url) as ca, Client(b.url) as cb:
        want = ca.execute(x)
        eventually(lambda: redis.client.dbsize() == 2, what="2 rows in Redis")
        keys = redis.client.keys()
        for key in keys:
            value = bytearray(redis.client.get(key))
            value[-1] ^= 0xFF                              # one bit flipped or more
            redis.client.set(key, bytes(value))
        computed = b.rows_computed()
        np.testing.assert_array_equal(cb.execute(x), want)
        assert b.rows_computed() == computed + 2            # computed again
        assert cache(b)["corrupt"] == 2 and cache(b)["shared_hits"] == 0
        # b wrote the rows it computed to Redis too: sound again for every replica
        from gpserve.cache.values import rows_of
        eventually(lambda: all(isinstance(rows_of(redis.client.get(k), ["y", "z"]), list)
                               for k in keys), what="the rows rewritten sound")


def test_after_a_streak_of_empty_lookups_one_in_sample_is_made_until_a_row_is_found():
    """The policy alone (no Redis): every lookup is made until WINDOW in a row found
    nothing; then one in SAMPLE; a lookup that finds a row makes them all again."""
    from gpserve.cache.shared import MissStreak
    streak = MissStreak()
    for _ in range(MissStreak.WINDOW):
        assert streak.worth_it()
        streak.found(0)
    made = [streak.worth_it() for _ in range(3 * MissStreak.SAMPLE)]
    assert made.count(True) == 3 and made[MissStreak.SAMPLE - 1]
    streak.found(2)                                 # a sampled lookup found rows
    assert all(streak.worth_it() for _ in range(MissStreak.WINDOW))
    streak.found(0)
    assert streak.worth_it()                        # one empty lookup is no streak


def test_rows_never_seen_skip_most_lookups_and_a_shared_row_ends_the_skipping(replicas):
    """A replica sent only new rows stops asking Redis for most of them (counted as
    skipped); once rows another replica computed come, it finds them again."""
    from gpserve.cache.shared import MissStreak
    redis, a, b = replicas
    n = MissStreak.WINDOW + 4 * MissStreak.SAMPLE
    with Client(a.url) as ca, Client(b.url) as cb:
        for i in range(n):
            cb.execute(np.full((1, 4), 1000 + i, np.float32))
        stats = cache(b)
        assert stats["shared_misses"] == MissStreak.WINDOW + 4 and stats["shared_hits"] == 0
        assert stats["shared_skipped"] == n - MissStreak.WINDOW - 4
        seen = np.arange(4 * MissStreak.SAMPLE, dtype=np.float32).reshape(-1, 4) - 1e4
        ca.execute(seen)                            # computed by a, written to Redis
        eventually(lambda: redis.client.dbsize() == n + len(seen), what="a's rows in Redis")
        for row in seen:                            # one of them is looked up: a hit
            cb.execute(row[None])
        assert cache(b)["shared_hits"] == 1
        x = np.full((1, 4), 7, np.float32)
        want = ca.execute(x)
        eventually(lambda: redis.client.dbsize() == n + len(seen) + 1, what="a's row")
        computed = b.rows_computed()
        np.testing.assert_array_equal(cb.execute(x), want)   # every lookup made again
        assert cache(b)["shared_hits"] == 2 and b.rows_computed() == computed


def test_rediss_shares_rows_over_tls_and_an_unknown_ca_serves_without_the_tier(model,
                                                                               tmp_path):
    """rediss:// with the server's certificate checked against the given CA: a row one
    replica computed is a hit on the other. A replica that does not trust the
    certificate (the system's CAs) serves without the tier, the failure counted."""
    with Redis(tls=tls_files(tmp_path / "tls")) as redis:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        with serve(model, redis.url, tmp_path, "a") as a, \
                serve(model, redis.url, tmp_path, "b") as b, \
                Client(a.url) as ca, Client(b.url) as cb:
            want = ca.execute(x)
            eventually(lambda: redis.client.dbsize() == 2, what="2 rows in Redis over TLS")
            np.testing.assert_array_equal(cb.execute(x), want)
            assert cache(b)["shared_hits"] == 2 and cache(b)["shared"]["up"] is True
        untrusted = redis.url.split("&ssl_ca_certs=")[0]    # verified against system CAs
        with serve(model, untrusted, tmp_path, "c") as c, Client(c.url) as cc:
            np.testing.assert_array_equal(cc.execute(x), want)
            eventually(lambda: cache(c)["shared_errors"] >= 1, what="the TLS failure counted")
            assert cache(c)["shared"]["up"] is False
            assert "CERTIFICATE_VERIFY_FAILED" in cache(c)["shared"]["last_error"]
