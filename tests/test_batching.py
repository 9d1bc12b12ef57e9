"""Dynamic batching: concurrent rows are merged, results equal separate calls, and the
server says whether batching changes a model's answers (workers/batch_check.py)."""
import asyncio

import numpy as np
import pytest
from conftest import MODELS, need_shared, ort_session

from gpserve.client import AsyncClient, Client
from gpserve.errors import BadConfig
from gpserve.testing import Server, eventually

CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def points(n: int, seed: int) -> np.ndarray:
    """n single-row requests for the default model (point Float32[-1, 2])."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 2)).astype(np.float32)


async def concurrent(url, rows, config=None):
    async with AsyncClient(url) as c:
        return await asyncio.gather(*(c.execute_multi([r], None, None, config) for r in rows))


def batch_dependent_model(path):
    """y = x / max|x| over the whole batch tensor: a row's answer depends on its neighbours,
    as with ONNX Runtime's dynamic quantization (one scale per batch tensor)."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["a"]),
         helper.make_node("ReduceMax", ["a"], ["m"], keepdims=0),
         helper.make_node("Div", ["x", "m"], ["y"])], "batchnorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_concurrent_rows_equal_separate_calls_and_were_batched():
    rows = points(64, 5)
    with Server("--max-delay-ms", "5") as s:
        with Client(s.url) as c:
            separate = [c.execute(r) for r in rows]
        before = s.stats()
        assert before["max_batch_rows"] == 1           # sequential calls: batches of one
        # Concurrent calls merge once a batch is running; repeat the burst until one did
        # (on a loaded machine a burst can trickle in), then compare every answer.
        together = []

        def merged() -> bool:
            together.extend(asyncio.run(concurrent(s.url, rows)))
            return s.stats()["max_batch_rows"] > 1
        eventually(merged, 120, "a merged batch")
        after = s.stats()
    for i, got in enumerate(together):          # kernels may round differently by batch size
        np.testing.assert_allclose(got[0], separate[i % 64], atol=1e-5)
    assert after["batched_rows"] - before["batched_rows"] == len(together)
    assert after["batches"] - before["batches"] < len(together)


def test_batching_off_runs_every_request_alone():
    with Server("--batching", "off") as s:
        asyncio.run(concurrent(s.url, points(16, 6)))
        stats = s.stats()
        info = s.info()
    assert stats["max_batch_rows"] == 1 and stats["batches"] == 16
    assert info["batching"]["enabled"] is False


def test_config_batch_off_runs_that_request_alone():
    with Server("--max-delay-ms", "5") as s:
        asyncio.run(concurrent(s.url, [np.repeat(r, 3, axis=0) for r in points(16, 7)],
                               config="batch=off"))
        stats = s.stats()
        with Client(s.url) as c, pytest.raises(BadConfig, match="batch takes 'on' or 'off'"):
            c.execute_multi([points(1, 0)[0]], None, None, "batch=sometimes")
    assert stats["batches"] == 16            # one batch per request, never merged


def test_request_larger_than_max_batch_runs_alone():
    x = points(10, 7).reshape(10, 2)
    with Server("--max-batch", "4") as s:
        with Client(s.url) as c:
            out = c.execute(x)
        stats = s.stats()
    assert out.shape == (10, 3)
    assert stats["max_batch_rows"] == 10


def test_mixed_shapes_batch_only_with_their_own():
    """Different non-batch shapes never share a batch; each gets its own answer (echo)."""
    rng = np.random.default_rng(8)
    a = rng.uniform(-1, 1, (24, 1, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, (24, 1, 5)).astype(np.float32)
    with Server("--model", "echo", "--workers", "2") as s:
        got = asyncio.run(concurrent(s.url, list(a) + list(b)))
    for x, y in zip(got, list(a) + list(b)):
        np.testing.assert_array_equal(x[0], y)


# -- does batching change answers? ----------------------------------------------------

def test_default_model_is_reported_batch_invariant():
    with Server("--batch-check-every", "1", "--max-delay-ms", "5") as s:
        batching = s.info()["batching"]
        assert batching["invariant"] is True
        assert batching["checks"]["probe"]["invariant"] is True
        assert batching["max_difference"] < 1e-5
        eventually(lambda: (asyncio.run(concurrent(s.url, points(32, 9))) and
                            s.info()["batching"]["checks"]["traffic"]["checks"] >= 1),
                   120, "a check on live traffic")
        traffic = s.info()["batching"]["checks"]["traffic"]
        assert traffic["changed"] == 0 and s.info()["batching"]["invariant"] is True
        assert s.metric("gpserve_batch_checks_total", result="same") >= 1
    assert "answers do not depend on the batch" in s.output()


def test_batch_dependent_model_is_reported_with_its_difference(tmp_path):
    model = batch_dependent_model(tmp_path / "batchnorm.onnx")
    with Server("--model", str(model), "--batch-check-every", "1", "--max-delay-ms", "5",
                "--cache", "--cache-dir", str(tmp_path / "rows")) as s:
        batching = s.info()["batching"]
        assert batching["invariant"] is False
        assert batching["checks"]["probe"]["invariant"] is False
        assert batching["max_difference"] > 0.1
        assert s.metric("gpserve_batch_difference") > 0.1
        rows = [np.full((1, 4), i + 1, np.float32) for i in range(32)]
        eventually(lambda: (asyncio.run(concurrent(s.url, rows, "cache=off")) and
                            s.info()["batching"]["checks"]["traffic"]["changed"] >= 1),
                   120, "a live check that saw a changed answer")
        assert s.metric("gpserve_batch_checks_total", result="changed") >= 1
        # alone, every row of ones is divided by its own max: exactly 1
        with Client(s.url) as c:
            for r in rows[:4]:
                got = c.execute_multi([r], None, None, "batch=off,cache=off")[0]
                np.testing.assert_array_equal(got, np.ones((1, 4), np.float32))
    log = s.output()
    assert "ANSWERS CHANGE WITH THE BATCH" in log
    assert "Serve with --batching off, or send config 'batch=off'" in log
    assert "cached rows hold whichever batch's answer came first" in log
    assert "batching changes this model's answers: a request run alone differs" in log


def test_ocr_classifier_is_reported_batch_invariant():
    with Server("--model", str(need_shared(CLS))) as s:
        batching = s.info()["batching"]
    assert batching["invariant"] is True and batching["max_difference"] < 1e-4


def test_minilm_int8_is_reported_batch_dependent(minilm_path):
    with Server("--model", str(minilm_path)) as s:
        batching = s.info()["batching"]
    assert batching["invariant"] is False and batching["max_difference"] > 1e-3
    assert batching["checks"]["probe"]["relative"] > 1e-3


def test_ocr_classifier_batched_rows_match_in_process():
    """Real model, merged batches: every row as in-process ONNX Runtime computes it."""
    rows = np.random.default_rng(5).uniform(-1, 1, (24, 1, 3, 48, 192)).astype(np.float32)
    want = ort_session(need_shared(CLS)).run(None, {"x": rows.reshape(24, 3, 48, 192)})[0]
    with Server("--model", str(CLS), "--max-delay-ms", "5") as s:
        got = asyncio.run(concurrent(s.url, rows))
    for i, g in enumerate(got):
        np.testing.assert_allclose(g[0][0], want[i], atol=1e-5)


@pytest.mark.parametrize("placement", ["workers", "fronts"])
def test_every_batch_size_formed_is_one_the_worker_warmed(placement):
    """--batch-sizes: a batch is padded up to the next listed size, and every size was
    run before traffic (on a GPU, no request then pays a runtime's first run of a shape:
    ``pow2`` is the default there). The padding rows never reach an answer."""
    with Server("--max-batch", "16", "--batch-sizes", "1,4", "--placement", placement,
                "--fronts", "1", "--batch-check-every", "0") as s:
        info = s.info()
        assert info["batching"]["warmed_sizes"] == [[1, 4, 16]]
        rng = np.random.default_rng(7)
        requests = [rng.uniform(-1, 1, (n, 2)).astype(np.float32) for n in (1, 2, 3, 5, 9, 16)]
        with Client(s.url) as c:
            batched = [c.execute(x) for x in requests]
            alone = [c.execute_multi([x], None, None, "batch=off")[0] for x in requests]
        for b, a, x in zip(batched, alone, requests):
            assert b.shape == (len(x), 3)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        rows = points(64, seed=3)
        asyncio.run(concurrent(s.url, rows))                    # merged batches, too
        stats = s.stats()
        # batched requests ran as 1, 4, 4, 16, 16, 16, then merged ones; batch=off ones
        # ran alone at their own sizes (1, 2, 3, 5, 9, 16): padding never applies to them
        assert set(stats["batch_size_histogram"]) <= {"1", "2", "3", "4", "5", "9", "16"}
        assert stats["padded_rows"] >= (4 - 2) + (4 - 3) + (16 - 5) + (16 - 9)
        assert stats["batched_rows"] == 2 * sum(len(x) for x in requests) + 64


def test_rows_that_arrive_while_the_device_runs_join_the_staged_batch():
    """While a batch runs, the next one is staged and takes the rows of its key as they
    arrive (copied in at once); it starts the moment the device frees, padded up to a
    warmed size, and every request gets its own rows back."""
    rng = np.random.default_rng(11)
    requests = [rng.uniform(-1, 1, (n, 16)).astype(np.float32) for n in (2, 3, 5, 9)]
    with Server("--model", "standin:500,0", "--workers", "1", "--placement", "workers",
                "--max-batch", "16", "--batch-sizes", "1,4,16", "--fronts", "1",
                "--batch-check-every", "0") as s:
        first = np.full((1, 16), 7, np.float32)

        async def load():
            async with AsyncClient(s.url) as c:
                running = asyncio.ensure_future(c.execute(first))   # the device: 500 ms
                while s.stats()["queued_rows"] < 1:
                    await asyncio.sleep(0.01)
                others = asyncio.gather(*(c.execute(x) for x in requests))
                while s.stats()["queued_rows"] < 1 + 19:
                    await asyncio.sleep(0.01)
                during = s.stats()["batches"]          # all 19 rows came while it ran
                return await running, await others, during
        alone, answers, during = asyncio.run(load())
        stats = s.stats()
    np.testing.assert_array_equal(alone, 2 * first)
    for got, x in zip(answers, requests):
        np.testing.assert_array_equal(got, 2 * x)
    assert during == 0 and stats["batches"] == 3, stats   # 19 rows: two batches of <= 16
    assert set(stats["batch_size_histogram"]) <= {"1", "4", "16"}, stats
    assert stats["batched_rows"] == 20 and stats["padded_rows"] == (
        sum(int(k) * v for k, v in stats["batch_size_histogram"].items()) - 20), stats


def test_closed_loop_clients_get_their_own_rows_through_held_batches():
    """Clients that send again once answered, on a model whose fixed cost makes the
    worker hold partial batches on its idle device for the clients just answered: rows
    joining a held batch are copied in as they come, each answer is its own rows, and
    the holds are counted."""
    async def client(url, seed):
        rng, rows = np.random.default_rng(seed), 0
        async with AsyncClient(url) as c:
            for _ in range(15):
                x = rng.uniform(-1, 1, (int(rng.integers(1, 4)), 16)).astype(np.float32)
                np.testing.assert_array_equal(await c.execute(x), 2 * x)
                rows += len(x)
        return rows

    async def clients(url):
        return sum(await asyncio.gather(*(client(url, seed) for seed in range(12))))
    with Server("--model", "standin:20,0", "--workers", "1", "--placement", "workers",
                "--max-batch", "16", "--max-delay-ms", "50", "--fronts", "2",
                "--batch-check-every", "0") as s:
        rows = asyncio.run(clients(s.url))
        stats = s.stats()
        # ~24 rows in flight, 16 a batch: a partial batch waits at each device free
        eventually(lambda: s.metric("gpserve_batch_hold_seconds_count") > 0,
                   what="a held batch in gpserve_batch_hold_seconds")
    assert stats["errors"] == {}, stats
    assert stats["batched_rows"] == rows and stats["batches"] < 12 * 15, stats


def test_an_empty_tensor_in_a_padded_batch_takes_no_rows_from_its_neighbours():
    """A request of 0 rows merged with others: it gets 0 rows back, the others their own,
    and padding repeats a real row (not the empty request's, which has none)."""
    rng = np.random.default_rng(12)
    three = rng.uniform(-1, 1, (3, 16)).astype(np.float32)
    empty = np.zeros((0, 16), np.float32)
    with Server("--model", "standin:300,0", "--workers", "1", "--placement", "workers",
                "--max-batch", "16", "--batch-sizes", "1,4,16", "--fronts", "1",
                "--batch-check-every", "0") as s:
        async def load():
            async with AsyncClient(s.url) as c:
                running = asyncio.ensure_future(c.execute(np.ones((1, 16), np.float32)))
                while s.stats()["queued_rows"] < 1:
                    await asyncio.sleep(0.01)
                got = await asyncio.gather(c.execute(three), c.execute(empty),
                                           c.execute(three))
                await running
                return got
        first, none, again = asyncio.run(load())
        assert s.stats()["errors"] == {}
    np.testing.assert_array_equal(first, 2 * three)
    np.testing.assert_array_equal(again, 2 * three)
    assert none.shape == (0, 16)


def test_a_burst_of_requests_run_alone_is_answered():
    """Hundreds of one-request batches formed in one go (echo runs them inline, one
    after another, without growing the stack)."""
    async def burst(url, rows):
        async with AsyncClient(url, max_connections=len(rows)) as c:
            return await asyncio.gather(*(c.execute_multi([r], None, None, "batch=off")
                                          for r in rows))
    with Server("--model", "echo", "--fronts", "1") as s:
        rows = points(600, seed=5)
        answers = asyncio.run(burst(s.url, rows))
        assert all(np.array_equal(a[0], r) for a, r in zip(answers, rows))
        assert s.stats()["batches"] == 600 and s.stats()["errors"] == {}
