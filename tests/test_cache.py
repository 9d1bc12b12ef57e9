"""The LMDB row cache, through a real server: same answers as without it, fewer rows computed."""
import asyncio
import subprocess
import sys

import numpy as np
import pytest
from conftest import MODELS, need_shared, scale_model

from gpserve.client import AsyncClient, Client
from gpserve.errors import BadConfig
from gpserve.testing import Server, eventually

CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
VAD = MODELS / "silero_vad_16k_op15.onnx"


def computed_since(server, before: int, expected: int | None = None) -> int:
    """Rows the model computed since ``before`` (``Server.rows_computed``: exact as soon
    as the client has its answer; ``expected`` is only for the reader)."""
    return server.rows_computed() - before


def wait_for_writes(server, count: int, timeout: float = 30) -> None:
    eventually(lambda: server.info()["cache"]["writes"] >= count, timeout,
               f"{count} cache writes")


@pytest.fixture(scope="module")
def cls_pair(tmp_path_factory):
    """The OCR classifier served with and without the cache."""
    cache_dir = tmp_path_factory.mktemp("rows")
    with Server("--model", str(need_shared(CLS)), "--cache", "--cache-dir", str(cache_dir)) as on, \
            Server("--model", str(CLS)) as off:
        yield on, off


def test_all_miss_all_hit_and_mixed_match_uncached(cls_pair):
    on, off = cls_pair
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (6, 3, 48, 192)).astype(np.float32)
    with Client(on.url) as c_on, Client(off.url) as c_off:
        want = c_off.execute(x)
        before = on.rows_computed()
        first = c_on.execute(x)                       # all miss
        assert computed_since(on, before, 6) == 6
        wait_for_writes(on, 6)
        second = c_on.execute(x)                      # all hit: no worker touched
        assert computed_since(on, before, 6) == 6
        fresh = rng.uniform(-1, 1, (3, 3, 48, 192)).astype(np.float32)
        mixed = np.stack([x[0], fresh[0], x[3], fresh[1], fresh[2], x[5]])   # interleaved
        got = c_on.execute(mixed)
        assert computed_since(on, before, 9) == 9        # only the 3 new rows were computed
        want_mixed = c_off.execute(mixed)
    np.testing.assert_allclose(first, want, atol=1e-5)
    np.testing.assert_array_equal(second, first)
    np.testing.assert_allclose(got, want_mixed, atol=1e-5)
    info = on.info()["cache"]
    assert info["hits"] >= 9 and info["entries"] >= 6 and info["enabled"]


def test_concurrent_clients_with_the_cache(cls_pair):
    on, off = cls_pair
    rows = np.random.default_rng(1).uniform(-1, 1, (32, 1, 3, 48, 192)).astype(np.float32)

    async def go(url):
        async with AsyncClient(url) as c:
            return await asyncio.gather(*(c.execute(r) for r in list(rows) + list(rows)))
    got, want = asyncio.run(go(on.url)), asyncio.run(go(off.url))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_opt_out_and_config_in_the_key(cls_pair):
    on, _ = cls_pair
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    with Client(on.url) as c:
        c.execute(x)
        wait_for_writes(on, on.info()["cache"]["writes"])
        before = on.rows_computed()
        c.execute_multi([x], None, None, config="cache=off")   # computed afresh
        assert computed_since(on, before, 2) == 2
        c.execute_multi([x], None, None, config="tenant=a")    # another config: a new key
        assert computed_since(on, before, 4) == 4
        with pytest.raises(BadConfig, match="cache takes 'on' or 'off'"):
            c.execute_multi([x], None, None, config="cache=maybe")


def test_minilm_multi_input_multi_output_and_subsets(minilm_path, tmp_path):
    ref = np.load(need_shared(MODELS / "fixtures" / "minilm_reference.npz"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    inputs = [ref[n] for n in names]
    with Server("--model", str(minilm_path), "--cache", "--cache-dir", str(tmp_path)) as on, \
            Server("--model", str(minilm_path)) as off, Client(on.url) as c_on, \
            Client(off.url) as c_off:
        want = c_off.execute_multi(inputs, names, ["last_hidden_state", "sentence_embedding"])
        emb = c_on.execute_multi(inputs, names, ["sentence_embedding"])[0]     # subset first
        wait_for_writes(on, 8)
        before = on.rows_computed()
        both = c_on.execute_multi(inputs, names, ["last_hidden_state", "sentence_embedding"])
        assert computed_since(on, before, 8) == 8          # the other output was not cached yet
        wait_for_writes(on, 16)
        again = c_on.execute_multi(inputs, names, ["sentence_embedding", "last_hidden_state"])
        assert computed_since(on, before, 8) == 8          # now both are
        half = c_on.execute_multi([i[::2] for i in inputs], names, ["sentence_embedding"])
        assert computed_since(on, before, 8) == 8
    np.testing.assert_allclose(emb, want[1], atol=1e-5)
    np.testing.assert_allclose(both[0], want[0], atol=1e-5)
    np.testing.assert_allclose(again[0], want[1], atol=1e-5)
    np.testing.assert_allclose(again[1], want[0], atol=1e-5)
    np.testing.assert_allclose(half[0], want[1][::2], atol=1e-5)


def test_changed_model_file_gives_fresh_results(tmp_path):
    model = scale_model(tmp_path / "scale.onnx", 2.0)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    flags = ["--model", str(model), "--cache", "--cache-dir", str(tmp_path / "rows")]
    with Server(*flags) as s, Client(s.url) as c:
        np.testing.assert_array_equal(c.execute(x, output_name="y"), x * 2)
        wait_for_writes(s, 2)
    scale_model(model, 3.0)                             # same path, new weights
    with Server(*flags) as s, Client(s.url) as c:
        np.testing.assert_array_equal(c.execute(x, output_name="y"), x * 3)
        assert computed_since(s, 0, 2) == 2


def test_rows_survive_a_restart_after_concurrent_writes_from_several_fronts(tmp_path):
    model = scale_model(tmp_path / "scale.onnx", 5.0)
    flags = ["--model", str(model), "--cache", "--cache-dir", str(tmp_path / "rows"),
             "--fronts", "2"]
    rows = np.random.default_rng(3).standard_normal((200, 1, 4)).astype(np.float32)

    async def send(url):
        async with AsyncClient(url) as c:
            return await asyncio.gather(*(c.execute(r, output_name="y") for r in rows))
    with Server(*flags) as s:
        asyncio.run(send(s.url))
        wait_for_writes(s, 200)
        assert s.info()["cache"]["entries"] == 200
    with Server(*flags) as s:
        got = asyncio.run(send(s.url))
        assert computed_since(s, 0, 0) == 0             # every row came from the cache
    for r, g in zip(rows, got):
        np.testing.assert_array_equal(g, r * 5)


def test_bound_holds_and_eviction_keeps_serving(tmp_path):
    width = 4096                                        # 16 KiB rows
    model = scale_model(tmp_path / "wide.onnx", 1.5, width)
    cache_dir = tmp_path / "rows"
    with Server("--model", str(model), "--cache", "--cache-dir", str(cache_dir),
                "--cache-size-mb", "1") as s, Client(s.url) as c:
        rng = np.random.default_rng(4)
        for _ in range(60):                             # ~8 MB of values through a 1 MB cache
            x = rng.standard_normal((8, width)).astype(np.float32)
            np.testing.assert_allclose(c.execute(x, output_name="y"), x * 1.5, rtol=1e-6)
        wait_for_writes(s, 400)
        info = s.info()["cache"]
        assert info["evictions"] >= 1 and info["errors"] == 0
        assert info["file_bytes"] <= 1 << 20
        data = next(cache_dir.rglob("data.mdb"))
        assert data.stat().st_size <= 1 << 20


def test_a_file_that_is_not_lmdb_is_moved_aside_and_a_fresh_cache_serves(tmp_path):
    model = scale_model(tmp_path / "scale.onnx", 2.0)
    cache_dir = tmp_path / "rows"
    flags = ["--model", str(model), "--cache", "--cache-dir", str(cache_dir)]
    x = np.ones((3, 4), np.float32)
    with Server(*flags) as s, Client(s.url) as c:
        c.execute(x, output_name="y")
        wait_for_writes(s, 3)
    data = next(cache_dir.rglob("data.mdb"))
    data.write_bytes(b"\xde\xad\xbe\xef" * 4096)         # not LMDB any more
    with Server(*flags) as s, Client(s.url) as c:      # moved aside; a fresh cache
        np.testing.assert_array_equal(c.execute(x, output_name="y"), x * 2)
        info = s.info()["cache"]
        assert info["enabled"] is True and info["errors"] == 0
        assert "not an LMDB data file" in s.output() and "moved aside to" in s.output()
        wait_for_writes(s, 3)
        np.testing.assert_array_equal(c.execute(x, output_name="y"), x * 2)
        assert s.info()["cache"]["hits"] == 3
    assert len(list(cache_dir.glob("*.damaged-*"))) == 1


def test_unwritable_cache_directory_still_serves(tmp_path):
    model = scale_model(tmp_path / "scale.onnx", 2.0)
    # /proc is read-only even for root: the cache cannot be created there.
    with Server("--model", str(model), "--cache", "--cache-dir", "/proc/gpserve-rows") as s, \
            Client(s.url) as c:
        x = np.ones((2, 4), np.float32)
        np.testing.assert_array_equal(c.execute(x, output_name="y"), x * 2)
        assert s.info()["cache"]["enabled"] is False


def test_string_rows_through_echo(tmp_path):
    arr = np.array([b"alpha", b"\xff\x00beta", b""], dtype=object)
    with Server("--model", "echo", "--cache", "--cache-dir", str(tmp_path)) as s, \
            Client(s.url) as c:
        assert c.execute(arr).tolist() == arr.tolist()
        wait_for_writes(s, 3)
        before = s.rows_computed()
        assert c.execute(arr[::-1]).tolist() == arr[::-1].tolist()
        assert computed_since(s, before, 0) == 0


def test_unbatchable_model_refuses_the_cache(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gpserve", "serve", "--model", str(need_shared(VAD)),
                        "--cache", "--cache-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "--cache needs a model whose rows are independent" in r.stderr
    assert "state Float32[2, -1, 128]" in r.stderr


def test_cache_commands(tmp_path):
    model = scale_model(tmp_path / "scale.onnx", 2.0)
    cache_dir = tmp_path / "rows"
    with Server("--model", str(model), "--cache", "--cache-dir", str(cache_dir)) as s, \
            Client(s.url) as c:
        c.execute(np.arange(20, dtype=np.float32).reshape(5, 4), output_name="y")
        wait_for_writes(s, 5)
    run = lambda *a: subprocess.run([sys.executable, "-m", "gpserve", "cache", *a,
                                     "--cache-dir", str(cache_dir)], capture_output=True,
                                    text=True, timeout=60)
    out = run("stats")
    assert out.returncode == 0 and '"model": "scale-' in out.stdout and '"entries": 5' in out.stdout
    assert "removed" in run("clear").stdout
    assert "no row caches" in run("stats").stdout
