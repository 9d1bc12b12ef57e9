"""The Open Inference Protocol (KServe v2) over HTTP, driven by Triton's own client from
PyPI (tritonclient, sync and aio, unmodified) and by raw HTTP for what no client sends."""
import asyncio
import json

import numpy as np
import pytest
import tritonclient.http as hc
import tritonclient.http.aio as hc_aio
import urllib3
from conftest import MODELS, need_shared, ort_session

from gpserve.client import Client
from gpserve.testing import Server, eventually

CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
FIXTURES = MODELS / "fixtures"

VALUES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 0, 32767]], np.int16),
    "INT32": np.array([[-2**31, 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-2**63, 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], np.float16),
    "FP32": np.array([[-1.5, 0.1, 3.4e38]], np.float32),
    "FP64": np.array([[-1.5, 0.1, 1e308]], np.float64),
    "BYTES": np.array([[b"", b"text", "\u00e9t\u00e9".encode()]], dtype=object),
}


@pytest.fixture(scope="module")
def echo():
    with Server("--model", "echo") as s:
        yield s


def host(server) -> str:
    return server.url.removeprefix("http://")


def post(server, path: str, body: bytes, headers: dict | None = None):
    return urllib3.request("POST", server.url + path, body=body, headers=headers or {},
                           retries=False)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(VALUES))
def test_echo_every_datatype_both_ways(echo, datatype, binary):
    x = np.repeat(VALUES[datatype], 2, axis=0)        # [2, 3]: two rows
    c = hc.InferenceServerClient(host(echo))
    inp = hc.InferInput("INPUT0", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    result = c.infer("echo", [inp], request_id="req-7",
                     outputs=[hc.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    got = result.as_numpy("OUTPUT0")
    out = result.get_output("OUTPUT0")
    assert out["datatype"] == datatype and out["shape"] == [2, 3]
    assert result.get_response()["id"] == "req-7"
    if datatype == "BYTES" and not binary:       # JSON carries text: the client gives str
        assert [s.encode() for s in got.ravel()] == list(x.ravel())
    else:
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)


def test_no_requested_outputs_come_back_binary_and_named(echo):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.arange(3, dtype=np.int32).reshape(3, 1)
    c = hc.InferenceServerClient(host(echo))
    a, b = hc.InferInput("a", [3, 4], "FP32"), hc.InferInput("b", [3, 1], "INT32")
    a.set_data_from_numpy(x)
    b.set_data_from_numpy(y, binary_data=False)
    result = c.infer("echo", [a, b])           # the client asks for binary_data_output
    np.testing.assert_array_equal(result.as_numpy("output"), x)
    np.testing.assert_array_equal(result.as_numpy("output1"), y)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_aio_client_concurrent_requests(echo):
    async def run():
        c = hc_aio.InferenceServerClient(host(echo))
        try:
            assert await c.is_server_ready() and await c.is_model_ready("echo")

            async def one(k):
                x = np.full((1, 8), k, np.float32)
                inp = hc_aio.InferInput("x", [1, 8], "FP32")
                inp.set_data_from_numpy(x)
                r = await c.infer("echo", [inp], model_version="1")
                return r.as_numpy("output")
            return await asyncio.gather(*(one(k) for k in range(32)))
        finally:
            await c.close()
    for k, got in enumerate(asyncio.run(run())):
        np.testing.assert_array_equal(got, np.full((1, 8), k, np.float32))


def test_server_and_model_routes(echo):
    c = hc.InferenceServerClient(host(echo))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("echo")
    assert c.is_model_ready("echo", "1") and not c.is_model_ready("resnet")
    meta = c.get_server_metadata()
    assert meta["name"] == "gpserve" and meta["extensions"] == [
        "binary_tensor_data", "model_configuration", "statistics"]
    model = c.get_model_metadata("echo")
    assert model["name"] == "echo" and model["versions"] == ["1"]
    config = c.get_model_config("echo")
    assert config["max_batch_size"] == 32
    assert echo.info()["protocols"] == {
        "graphpipe": "POST / (the default model), POST /models/<name>",
        "open_inference_protocol": {"rest": "/v2", "grpc": None,
                                    "system_shared_memory": False}}
    [model] = echo.info()["models"]
    assert {k: model[k] for k in ("name", "version", "versions", "state", "backend",
                                  "graphpipe", "v2")} == {
        "name": "echo", "version": "1", "versions": ["1"], "state": "READY",
        "backend": "echo", "graphpipe": "/models/echo/versions/1",
        "v2": "/v2/models/echo/versions/1"}
    assert model["batching"]["max_batch"] == 32 and model["cache"] is None


def test_default_model_metadata_config_and_answers():
    with Server() as s:
        c = hc.InferenceServerClient(host(s))
        name = s.info()["name"]
        meta = c.get_model_metadata(name)
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "point", "datatype": "FP32", "shape": [-1, 2]}]
        (out,) = meta["outputs"]
        config = c.get_model_config(name)
        assert config["input"] == [{"name": "point", "data_type": "TYPE_FP32", "dims": [2]}]
        x = np.array([[0.2, 0.3], [-0.5, 0.9]], np.float32)
        with Client(s.url) as gp:
            want = gp.execute(x)
        inp = hc.InferInput("point", [2, 2], "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        got = c.infer(name, [inp]).as_numpy(out["name"])
        np.testing.assert_array_equal(got, want)      # the same model, the same bytes
        _errors(s, name, x)


def _errors(s, name: str, x: np.ndarray) -> None:
    """Every malformed request: its HTTP status and a message that names the problem;
    the server answers the next request as before."""
    good = {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    infer = f"/v2/models/{name}/infer"
    cases = [
        ("/v2/models/resnet/infer", good, 404,
         "Request for unknown model: 'resnet' is not found"),         # Triton's words
        (f"/v2/models/{name}/versions/7/infer", good, 404, f"'{name}' version 7 is not"),
        (infer, b"{not json", 400, "malformed"),
        (infer, {"inputs": []}, 400, "non-empty list"),
        (infer, {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "INT32",
                             "data": [1, 2, 3, 4]}]}, 400, "'point' is Int32"),
        (infer, {"inputs": [{"name": "pt", "shape": [2, 2], "datatype": "FP32",
                             "data": [1, 2, 3, 4]}]}, 400, "unknown input 'pt'"),
        (infer, {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "FP32",
                             "data": [1, 2, 3]}]}, 400, "takes 4"),
        (infer, {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "FP32",
                             "data": ["a", "b", "c", "d"]}]}, 400, "string values"),
        (infer, {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "BF16",
                             "data": [1, 2, 3, 4]}]}, 400, "'BF16'"),
        (infer, {"inputs": [{"name": "point", "shape": [2, -2], "datatype": "FP32",
                             "data": [1, 2, 3, 4]}]}, 400, "'shape'"),
        (infer, {**good, "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        (infer, {"inputs": [{"name": "point", "shape": [10**11, 0], "datatype": "FP32",
                             "data": []}]}, 400, "larger than the request itself"),
        (infer, {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "FP32",
                             "parameters": {"binary_data_size": 16}}]}, 400,
         "does not fit"),
        (infer, {**good, "parameters": {"cache": "maybe"}}, 400, "'cache'"),
        (infer, {"inputs": [{"name": "point", "shape": [2, 2], "datatype": "FP32",
                             "parameters": {"shared_memory_region": "r"}}]}, 400,
         "--shm-clients"),
    ]
    for path, body, status, words in cases:
        r = post(s, path, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert r.status == status, (path, body, r.data)
        assert words in json.loads(r.data)["error"], (body, r.data)
    # binary: 16 bytes announced, 12 sent
    head = json.dumps({"inputs": [{"name": "point", "shape": [2, 2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    r = post(s, infer, head + bytes(12), {"Inference-Header-Content-Length": str(len(head))})
    assert r.status == 400 and "does not fit" in json.loads(r.data)["error"]
    r = post(s, infer, head + bytes(20), {"Inference-Header-Content-Length": str(len(head))})
    assert r.status == 400 and "4 bytes after" in json.loads(r.data)["error"]
    r = post(s, infer, head, {"Inference-Header-Content-Length": str(len(head) + 1)})
    assert r.status == 400 and "does not fit" in json.loads(r.data)["error"]
    r = urllib3.request("GET", s.url + infer)
    assert r.status == 405 and "use POST" in json.loads(r.data)["error"]
    r = urllib3.request("GET", s.url + "/v2/nothing")
    assert r.status == 404
    r = post(s, infer, json.dumps(good).encode())
    (out,) = json.loads(r.data)["outputs"]
    assert r.status == 200 and out["shape"][0] == 2
    assert len(out["data"]) == out["shape"][0] * out["shape"][1]


def test_ocr_classifier_labels_shared_cache_and_batches_with_graphpipe(tmp_path):
    """The OCR classifier through the protocol gives the fixture labels; rows sent by
    GraphPipe answer the same rows sent by the protocol from the row cache; and rows of
    both protocols batch together."""
    x = np.load(need_shared(FIXTURES / "ocr_cls_input.npy"))
    want = ort_session(CLS).run(None, {"x": x})[0]
    with Server("--model", str(CLS), "--cache", "--cache-dir", str(tmp_path),
                "--workers", "1") as s:
        c = hc.InferenceServerClient(host(s))
        name = s.info()["name"]
        out = c.get_model_metadata(name)["outputs"][0]["name"]
        inp = hc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer(name, [inp], parameters={"cache": False}).as_numpy(out)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert got.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
        with Client(s.url) as gp:
            gp.execute(x)                                   # computed, then cached
        eventually(lambda: s.info()["cache"]["writes"] >= len(x), 30, "cache writes")
        before = s.rows_computed()
        cached = c.infer(name, [inp]).as_numpy(out)
        assert s.rows_computed() == before                  # every row from the cache
        np.testing.assert_array_equal(cached, got)


def test_rows_of_both_protocols_batch_together():
    """While the device is busy, a GraphPipe request and a protocol request of the same
    shape queue; they run as one batch."""
    x = np.ones((1, 16), np.float32)
    with Server("--model", "standin:300,0", "--workers", "1", "--placement", "workers",
                "--max-batch", "8", "--batch-check-every", "0") as s:
        c = hc.InferenceServerClient(host(s), concurrency=2)
        inp = hc.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        before = s.stats()
        first = c.async_infer("standin", [inp])            # occupies the worker 300 ms
        eventually(lambda: s.stats()["queued_rows"] >= 1, 10, "the first row running")
        second = c.async_infer("standin", [inp])
        eventually(lambda: s.stats()["queued_rows"] >= 2, 10, "the second row queued")
        with Client(s.url) as gp:
            np.testing.assert_array_equal(gp.execute(x), 2 * x)
        np.testing.assert_array_equal(second.get_result().as_numpy("y"), 2 * x)
        np.testing.assert_array_equal(first.get_result().as_numpy("y"), 2 * x)
        after = s.stats()
        assert after["batches"] - before["batches"] == 2, after   # the first; both others
        ran = {k: after["batch_size_histogram"].get(k, 0) -
               before["batch_size_histogram"].get(k, 0) for k in ("1", "2")}
        assert ran == {"1": 1, "2": 1}, after


def test_requested_outputs_chosen_ordered_and_mixed(minilm_path):
    """MiniLM (three INT64 inputs, two outputs): one output asked for comes back alone;
    both, in the order asked, one in binary and one in JSON."""
    ref = np.load(need_shared(FIXTURES / "minilm_reference.npz"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    want = ort_session(minilm_path).run(None, {n: ref[n] for n in names})
    with Server("--model", str(minilm_path)) as s:
        c = hc.InferenceServerClient(host(s))
        name = s.info()["name"]
        inputs = []
        for n in names:
            inputs.append(hc.InferInput(n, list(ref[n].shape), "INT64"))
            inputs[-1].set_data_from_numpy(ref[n])
        r = c.infer(name, inputs, outputs=[hc.InferRequestedOutput("sentence_embedding")])
        assert [o["name"] for o in r.get_response()["outputs"]] == ["sentence_embedding"]
        np.testing.assert_allclose(r.as_numpy("sentence_embedding"), want[1], atol=1e-5)
        r = c.infer(name, inputs, outputs=[
            hc.InferRequestedOutput("sentence_embedding", binary_data=False),
            hc.InferRequestedOutput("last_hidden_state", binary_data=True)])
        outs = r.get_response()["outputs"]
        assert [o["name"] for o in outs] == ["sentence_embedding", "last_hidden_state"]
        assert "data" in outs[0] and "binary_data_size" in outs[1]["parameters"]
        np.testing.assert_allclose(r.as_numpy("sentence_embedding"), want[1], atol=1e-5)
        np.testing.assert_allclose(r.as_numpy("last_hidden_state"), want[0], atol=1e-5)


def test_kserve_sdk_rest_client(echo, kserve_python):
    """KServe's own SDK (its v2 REST client, unmodified, in a venv of its own): health,
    readiness, and JSON and binary tensors."""
    import subprocess
    from pathlib import Path
    peer = Path(__file__).with_name("kserve_peer.py")
    proc = subprocess.run([str(kserve_python), str(peer), echo.url, "echo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["live"] is True and got["ready"] is True
    for way in ("json", "binary"):
        assert got[way] == {"id": "k1", "name": "output", "shape": [3, 2], "equal": True,
                            "dtype": "float32"}, got


def test_large_binary_body_streamed_with_a_misaligned_neighbour(echo):
    """A 4.8 MB body arrives in many pieces and streams into shared memory; an odd-sized
    UINT8 tensor before it leaves the float tensor unaligned in the body: both come
    back exact."""
    odd = np.arange(3, dtype=np.uint8)
    big = np.random.default_rng(1).standard_normal((8, 224, 224, 3)).astype(np.float32)
    c = hc.InferenceServerClient(host(echo), network_timeout=120)
    a, b = hc.InferInput("a", [3], "UINT8"), hc.InferInput("b", list(big.shape), "FP32")
    a.set_data_from_numpy(odd)
    b.set_data_from_numpy(big)
    r = c.infer("echo", [a, b])
    np.testing.assert_array_equal(r.as_numpy("output"), odd)
    np.testing.assert_array_equal(r.as_numpy("output1"), big)
    b2 = hc.InferInput("b", list(big.shape), "FP32")
    b2.set_data_from_numpy(big)
    np.testing.assert_array_equal(c.infer("echo", [b2]).as_numpy("output"), big)
