"""Every bad request gets a non-200 status and a GraphPipe Error naming what was wrong,
and the server keeps serving everyone else."""
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import urllib3

from gpserve import errors as E
from gpserve import protocol as P
from gpserve.client import Client

from conftest import MODELS, need_shared
from gpserve.testing import Server

CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
ROW = np.zeros((1, 3, 48, 192), np.float32)


@pytest.fixture(scope="module")
def server():
    with Server("--model", str(need_shared(CLS)), "--max-body-mb", "4", "--max-queue", "16") as s:
        yield s


def post(url, body):
    r = urllib3.request("POST", url + "/", body=bytes(body), retries=False, timeout=60)
    return r.status, P.decode_response(r.data).errors


def infer_body(tensors, input_names=(), output_names=(), config=""):
    return P.encode_request(P.InferRequest(tensors, list(input_names), list(output_names), config))


def assert_error(url, body, status, cls, *fragments):
    got_status, errs = post(url, body)
    assert got_status == status
    assert len(errs) == 1 and errs[0].code == cls.code, errs
    for fragment in fragments:
        assert fragment in errs[0].message, errs[0].message


def test_unparseable_body(server):
    assert_error(server.url, b"definitely not a flatbuffer", 400, E.ProtocolError,
                 "malformed GraphPipe message")
    assert_error(server.url, b"", 400, E.ProtocolError, "too short")


def test_wrong_union_tag(server):
    body = bytearray(infer_body([ROW]))
    root = int.from_bytes(body[0:4], "little")
    vtable = root - int.from_bytes(body[root:root + 4], "little", signed=True)
    body[root + int.from_bytes(body[vtable + 4:vtable + 6], "little")] = 9
    assert_error(server.url, body, 400, E.UnsupportedRequest, "req_type is 9",
                 "1 (InferRequest) or 2 (MetadataRequest)")


def test_unknown_input_and_output(server):
    assert_error(server.url, infer_body([ROW], ["image"]), 400, E.UnknownInput,
                 "unknown input 'image'", "x Float32[-1, 3, -1, -1]")
    assert_error(server.url, infer_body([ROW], ["x"], ["probs"]), 400, E.UnknownOutput,
                 "unknown output 'probs'", "save_infer_model/scale_0.tmp_1")


def test_wrong_count_of_tensors(server):
    assert_error(server.url, infer_body([ROW, ROW]), 400, E.WrongInputCount,
                 "2 tensors and no input names", "takes 1: x")
    assert_error(server.url, infer_body([ROW], ["x", "x"]), 400, E.WrongInputCount,
                 "2 input names for 1 tensors")


def test_dtype_and_shape_that_do_not_fit(server):
    assert_error(server.url, infer_body([ROW.astype(np.float64)]), 400, E.DtypeMismatch,
                 "input 'x' is Float64", "takes Float32")
    assert_error(server.url, infer_body([np.zeros((1, 4, 48, 192), np.float32)]), 400,
                 E.ShapeMismatch, "shape [1, 4, 48, 192]", "[-1, 3, -1, -1]")
    assert_error(server.url, infer_body([np.zeros((3, 48, 192), np.float32)]), 400,
                 E.ShapeMismatch, "shape [3, 48, 192]")


def test_body_over_the_limit(server):
    big = np.zeros((40, 3, 48, 192), np.float32)   # 4.4 MB > 4 MiB
    assert_error(server.url, infer_body([big]), 413, E.BodyTooLarge, "over --max-body-mb 4")


def test_queue_full(server):
    rows = np.zeros((17, 3, 48, 192), np.float32)
    assert_error(server.url, infer_body([rows]), 503, E.QueueFull, "queue is full",
                 "adds 17, past --max-queue 16")


def test_graphpipe_client_sees_http_error_with_graphpipe_body(server, graphpipe):
    got = graphpipe.one("execute_multi", server.url, [ROW], ["nope"], None, None)
    assert got["error"] == "HTTPError" and got["status"] == 400
    errs = P.decode_response(got["body"]).errors
    assert errs[0].code == E.UnknownInput.code and "unknown input 'nope'" in errs[0].message


def test_client_raises_typed_errors(server):
    with Client(server.url) as c:
        with pytest.raises(E.DtypeMismatch) as info:
            c.execute(ROW.astype(np.float16))
    assert info.value.http_status == 400 and info.value.code == 6


def test_bad_requests_lose_no_other_request(server):
    """Good and bad requests from 8 threads at once: every good one gets its answer."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    with Client(server.url) as c:
        want = c.execute(x)
    bad = [b"junk", infer_body([ROW], ["nope"]), infer_body([ROW.astype(np.int32)]),
           infer_body([np.zeros((20, 3, 48, 192), np.float32)])]

    def one(i):
        if i % 2:
            return post(server.url, bad[i // 2 % len(bad)])[0]
        with Client(server.url) as c:
            return c.execute(x)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(80)))
    for i, r in enumerate(results):
        if i % 2:
            assert r in (400, 503)
        else:
            np.testing.assert_allclose(r, want, atol=1e-5)


def test_deadline_passed():
    with Server("--model", str(need_shared(CLS)), "--timeout-ms", "50") as s:
        many = np.zeros((200, 3, 48, 192), np.float32)   # far more than 50 ms of work
        assert_error(s.url, infer_body([many]), 504, E.DeadlineExceeded,
                     "no result within --timeout-ms 50")
        deadline = time.monotonic() + 60      # still serving, once the long batch is done
        while s.stats()["batches"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client(s.url) as c:
            assert c.execute(ROW).shape == (1, 2)


def failing_model(path):
    """A valid model that fails at run time when its input's size is not a multiple of 3."""
    from onnx import TensorProto, helper
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph(
        [node], "reshape3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_model_error_and_batch_isolation(tmp_path):
    model = failing_model(tmp_path / "reshape3.onnx")
    with Server("--model", str(model), "--batching", "off") as s:
        assert_error(s.url, infer_body([np.ones((1, 4), np.float32)]), 500, E.ModelError,
                     "the model failed")
        with Client(s.url) as c:
            np.testing.assert_array_equal(c.execute(np.arange(6, dtype=np.float32)
                                                    .reshape(2, 3)),
                                          np.arange(6, dtype=np.float32).reshape(2, 3))
