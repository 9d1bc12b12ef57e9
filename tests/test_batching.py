"""Dynamic batching: concurrent rows are merged, results equal separate calls."""
import asyncio

import numpy as np
import pytest

from gpserve.client import AsyncClient, Client

from conftest import MODELS, need_shared
from gpserve.testing import Server

CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


async def concurrent(url, rows):
    async with AsyncClient(url) as c:
        return await asyncio.gather(*(c.execute(r) for r in rows))


def test_64_concurrent_rows_equal_separate_calls_and_were_batched():
    rows = np.random.default_rng(5).uniform(-1, 1, (64, 1, 3, 48, 192)).astype(np.float32)
    with Server("--model", str(need_shared(CLS)), "--max-delay-ms", "5") as s:
        with Client(s.url) as c:
            separate = [c.execute(r) for r in rows]
        before = s.stats()
        assert before["max_batch_rows"] == 1           # sequential calls: batches of one
        together = asyncio.run(concurrent(s.url, rows))
        after = s.stats()
    # ONNX Runtime's kernels may round differently at different batch sizes: 1e-5.
    for a, b in zip(together, separate):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert after["max_batch_rows"] > 1
    assert after["batched_rows"] - before["batched_rows"] == 64
    assert after["batches"] - before["batches"] < 64


def test_batching_off_runs_every_request_alone():
    rows = np.random.default_rng(6).uniform(-1, 1, (16, 1, 3, 48, 192)).astype(np.float32)
    with Server("--model", str(need_shared(CLS)), "--batching", "off") as s:
        asyncio.run(concurrent(s.url, rows))
        stats = s.stats()
    assert stats["max_batch_rows"] == 1 and stats["batches"] == 16


def test_request_larger_than_max_batch_runs_alone():
    x = np.random.default_rng(7).uniform(-1, 1, (10, 3, 48, 192)).astype(np.float32)
    with Server("--model", str(need_shared(CLS)), "--max-batch", "4") as s:
        with Client(s.url) as c:
            out = c.execute(x)
        stats = s.stats()
    assert out.shape == (10, 2)
    assert stats["max_batch_rows"] == 10


@pytest.mark.parametrize("workers", [2])
def test_mixed_shapes_batch_only_with_their_own(workers):
    """Different non-batch shapes never share a batch; each gets its own answer."""
    rng = np.random.default_rng(8)
    a = rng.uniform(-1, 1, (24, 1, 3, 48, 192)).astype(np.float32)
    b = rng.uniform(-1, 1, (24, 1, 3, 48, 96)).astype(np.float32)
    with Server("--model", str(need_shared(CLS)), "--workers", str(workers)) as s:
        with Client(s.url) as c:
            want = [c.execute(r) for r in list(a) + list(b)]
        got = asyncio.run(concurrent(s.url, list(a) + list(b)))
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, atol=1e-5)
