"""Real models served by a real server: gpserve's client and the unmodified graphpipe 1.0.4
client both get what in-process ONNX Runtime computes on the same inputs."""
import json

import numpy as np
import pytest
from conftest import MODELS, need_shared, ort_session

from gpserve.client import AsyncClient, Client
from gpserve.errors import UnknownInput
from gpserve.testing import Server

CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC = MODELS / "ch_PP-OCRv4_rec_infer.onnx"
VAD = MODELS / "silero_vad_16k_op15.onnx"
FIXTURES = MODELS / "fixtures"


@pytest.fixture(scope="module")
def cls_server():
    with Server("--model", str(need_shared(CLS)), "--workers", "1") as s:
        yield s


def test_ocr_classifier_labels_and_values(cls_server, graphpipe):
    x = np.load(FIXTURES / "ocr_cls_input.npy")
    want = ort_session(CLS).run(None, {"x": x})[0]
    with Client(cls_server.url) as c:
        got = c.execute(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    theirs = graphpipe.one("execute", cls_server.url, x)
    np.testing.assert_allclose(theirs, want, atol=1e-5)


def test_ocr_classifier_random_inputs_named(cls_server, graphpipe):
    x = np.random.default_rng(3).uniform(-1, 1, (5, 3, 48, 192)).astype(np.float32)
    want = ort_session(CLS).run(None, {"x": x})[0]
    out_name = "save_infer_model/scale_0.tmp_1"
    with Client(cls_server.url) as c:
        got = c.execute(x, input_name="x", output_name=out_name)
    np.testing.assert_allclose(got, want, atol=1e-5)
    theirs = graphpipe.one("execute_multi", cls_server.url, [x], ["x"], [out_name], None)
    np.testing.assert_allclose(theirs[0], want, atol=1e-5)


def test_metadata_from_the_model(cls_server, graphpipe):
    with Client(cls_server.url) as c:
        meta = c.metadata()
    assert [(i.name, i.shape, str(i.dtype)) for i in meta.inputs] == [
        ("x", [-1, 3, -1, -1], "float32")]
    assert [(o.name, o.shape) for o in meta.outputs] == [
        ("save_infer_model/scale_0.tmp_1", [-1, 2])]
    theirs = graphpipe.one("metadata", cls_server.url)
    assert theirs["inputs"][0]["name"] == "x" and theirs["inputs"][0]["type"] == 10
    assert theirs["inputs"][0]["shape"] == [-1, 3, -1, -1]
    info = cls_server.info()
    assert info["inputs"] == [{"name": "x", "shape": [-1, 3, -1, -1], "type": "Float32"}]
    assert info["batching"]["enabled"] is True and info["batching"]["max_batch"] == 32


def test_async_client(cls_server):
    import asyncio
    x = np.load(FIXTURES / "ocr_cls_input.npy")

    async def go():
        async with AsyncClient(cls_server.url) as c:
            outs = await asyncio.gather(*(c.execute(x[i:i + 1]) for i in range(6)))
            meta = await c.metadata()
            with pytest.raises(UnknownInput, match="unknown input 'nope'") as e:
                await c.execute(x, input_name="nope")
            assert e.value.http_status == 400
            return outs, meta
    outs, meta = asyncio.run(go())
    assert [int(o.argmax()) for o in outs] == [0, 0, 0, 1, 1, 1]
    assert meta.inputs[0].name == "x"


def test_ocr_recogniser_decodes_text():
    x = np.load(need_shared(FIXTURES / "ocr_rec_input.npy"))
    want = ort_session(need_shared(REC)).run(None, {"x": x})[0]
    with Server("--model", str(REC)) as s, Client(s.url) as c:
        got = c.execute(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    sess = ort_session(REC)
    chars = ["blank"] + sess.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]
    texts = []
    for row in got.argmax(2):
        keep = [c for i, c in enumerate(row) if c and (i == 0 or c != row[i - 1])]
        texts.append("".join(chars[c] for c in keep))
    assert texts == ["Hello World 2025", "GraphPipe inference", "ONNX Runtime 1.32"]


def test_minilm_three_int64_inputs_two_outputs(minilm_path, graphpipe):
    ref = np.load(need_shared(FIXTURES / "minilm_reference.npz"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    feed = {n: ref[n] for n in names}
    want = ort_session(minilm_path).run(None, feed)
    with Server("--model", str(minilm_path)) as s, Client(s.url) as c:
        hidden, emb = c.execute_multi([feed[n] for n in names], names,
                                      ["last_hidden_state", "sentence_embedding"])
        np.testing.assert_allclose(emb, want[1], atol=1e-5)
        np.testing.assert_allclose(hidden, want[0], atol=1e-5)
        # The fixture was made on another CPU; int8 kernels differ by instruction set
        # (up to 0.027 on an AVX2-only EPYC), so it is compared by cosine only.
        fixture = ref["emb_int8_ort"]
        cosine = (emb * fixture).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(
            fixture, axis=1)
        assert cosine.min() >= 0.98, cosine
        # default inputs in order, one named output
        only = c.execute_multi([feed[n] for n in names], None, ["sentence_embedding"])
        np.testing.assert_allclose(only[0], want[1], atol=1e-5)
        theirs = graphpipe.one("execute_multi", s.url, [feed[n] for n in names], names,
                               ["sentence_embedding"], None)
        np.testing.assert_allclose(theirs[0], want[1], atol=1e-5)


def test_silero_vad_unbatched_with_scalar_input(graphpipe):
    """state [2,N,128] is not batch-first and sr is a scalar: served unbatched."""
    sess = ort_session(need_shared(VAD))
    rng = np.random.default_rng(0)
    frames = rng.uniform(-0.5, 0.5, (4, 1, 576)).astype(np.float32)
    with Server("--model", str(VAD)) as s, Client(s.url) as c:
        assert s.info()["batching"]["enabled"] is False
        state = np.zeros((2, 1, 128), np.float32)
        ref_state = state.copy()
        sr = np.array(16000, dtype=np.int64)
        for frame in frames:
            prob, state = c.execute_multi([frame, state, sr], ["input", "state", "sr"],
                                          ["output", "stateN"])
            want, ref_state = sess.run(None, {"input": frame, "state": ref_state, "sr": sr})
            np.testing.assert_allclose(prob, want, atol=1e-5)
            np.testing.assert_allclose(state, ref_state, atol=1e-5)
        theirs = graphpipe.one("execute_multi", s.url, [frames[0], np.zeros((2, 1, 128),
                               np.float32), sr], ["input", "state", "sr"], ["output"], None)
        np.testing.assert_allclose(
            theirs[0], sess.run(["output"], {"input": frames[0], "state": np.zeros(
                (2, 1, 128), np.float32), "sr": sr})[0], atol=1e-5)


ECHO_TYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
              "float16", "float32", "float64"]


@pytest.fixture(scope="module")
def echo_server():
    with Server("--model", "echo") as s:
        yield s


def test_echo_every_type_both_clients(echo_server, graphpipe):
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal((3, 5)) * 100).astype(t) for t in ECHO_TYPES]
    arrays += [np.array(7.5, np.float32), np.zeros((0, 3), np.int32),
               np.array([[b"a", b"\xff\xfe"], [b"", b"long" * 100]], dtype=object)]
    with Client(echo_server.url) as c:
        for arr in arrays:
            got = c.execute(arr)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tolist() == arr.tolist()
        multi = c.execute_multi(arrays, None, None)
        assert [m.tolist() for m in multi] == [a.tolist() for a in arrays]
    theirs = graphpipe.one("execute_multi", echo_server.url, arrays, None, None, None)
    for got, arr in zip(theirs, arrays):
        got = np.asarray(got)
        assert got.shape == arr.shape
        if arr.dtype == object:        # graphpipe gives numpy 'S' arrays for strings
            assert [bytes(x) for x in got.flat] == list(arr.flat)
        else:
            assert got.dtype == arr.dtype and got.tolist() == arr.tolist()


def test_echo_large_tensor_round_trip(echo_server):
    arr = np.random.default_rng(1).random((16, 224, 224, 3), dtype=np.float32)
    with Client(echo_server.url) as c:
        np.testing.assert_array_equal(c.execute(arr), arr)


def test_get_returns_json_metadata(echo_server):
    info = echo_server.info()
    assert info["name"] == "echo" and info["backend"] == "echo"
    assert set(info["processes"]["pids"]) == {"supervisor", "workers", "fronts"}
    json.dumps(info)
