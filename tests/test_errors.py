"""Every bad request gets a non-200 status and a GraphPipe Error naming what was wrong,
and the server keeps serving everyone else."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import urllib3

from gpserve import errors as E
from gpserve import protocol as P
from gpserve.client import Client
from gpserve.testing import Server, eventually

# The default model (no files needed, so a fresh clone runs these): point Float32[-1, 2]
# in, probabilities Float32[-1, 3] out.
ROW = np.zeros((1, 2), np.float32)


@pytest.fixture(scope="module")
def server():
    with Server("--max-body-mb", "4", "--max-queue", "16") as s:
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
                 "unknown input 'image'", "point Float32[-1, 2]")
    assert_error(server.url, infer_body([ROW], ["point"], ["probs"]), 400, E.UnknownOutput,
                 "unknown output 'probs'", "probabilities Float32[-1, 3]")


def test_wrong_count_of_tensors(server):
    assert_error(server.url, infer_body([ROW, ROW]), 400, E.WrongInputCount,
                 "2 tensors and no input names", "takes 1: point")
    assert_error(server.url, infer_body([ROW], ["x", "x"]), 400, E.WrongInputCount,
                 "2 input names for 1 tensors")


def test_dtype_and_shape_that_do_not_fit(server):
    assert_error(server.url, infer_body([ROW.astype(np.float64)]), 400, E.DtypeMismatch,
                 "input 'point' is Float64", "takes Float32")
    assert_error(server.url, infer_body([np.zeros((1, 4), np.float32)]), 400,
                 E.ShapeMismatch, "shape [1, 4]", "[-1, 2]")
    assert_error(server.url, infer_body([np.zeros((3,), np.float32)]), 400,
                 E.ShapeMismatch, "shape [3]")


def test_body_over_the_limit(server):
    big = np.zeros((600_000, 2), np.float32)   # 4.8 MB > 4 MiB
    assert_error(server.url, infer_body([big]), 413, E.BodyTooLarge, "over --max-body-mb 4")


def test_more_rows_than_the_queue_holds(server):
    """Such a request could never be queued: 413 and what to do, not 503 'retry later'."""
    rows = np.zeros((17, 2), np.float32)
    assert_error(server.url, infer_body([rows]), 413, E.TooManyRows, "17 rows",
                 "--max-queue 16", "split it into requests of at most 16 rows")
    with Client(server.url) as c:                 # 16 rows fit: served
        assert c.execute(rows[:16]).shape == (16, 3)


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
    x = np.random.default_rng(0).uniform(-1, 1, (2, 2)).astype(np.float32)
    with Client(server.url) as c:
        want = c.execute(x)
    bad = [b"junk", infer_body([ROW], ["nope"]), infer_body([ROW.astype(np.int32)]),
           infer_body([np.zeros((20, 2), np.float32)])]

    def one(i):
        if i % 2:
            return post(server.url, bad[i // 2 % len(bad)])[0]
        with Client(server.url) as c:
            return c.execute(x)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(80)))
    for i, r in enumerate(results):
        if i % 2:
            assert r in (400, 413)
        else:
            np.testing.assert_allclose(r, want, atol=1e-5)


def slow_model(path, iterations: int = 1_000_000):
    """y = x [N,4], after an ONNX Loop of ``iterations`` scalar Adds: under a microsecond
    each on any machine, so about a second of work whatever the batch, while its
    arithmetic is too small for faster CPUs to shortcut (a big MatMul is not: 16 GFLOP
    took 48 ms on an AVX-512 machine)."""
    from onnx import TensorProto, helper
    scalar = lambda name, kind: helper.make_tensor_value_info(name, kind, [])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]),
         helper.make_node("Add", ["v", "v"], ["v_out"])], "spin",
        [scalar("i", TensorProto.INT64), scalar("cond", TensorProto.BOOL),
         scalar("v", TensorProto.FLOAT)],
        [scalar("cond_out", TensorProto.BOOL), scalar("v_out", TensorProto.FLOAT)])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "zero"], ["spun"], body=body),
         helper.make_node("Add", ["x", "spun"], ["y"])], "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[helper.make_tensor("n", TensorProto.INT64, [], [iterations]),
                     helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("placement", ["workers", "fronts"])
def test_deadline_passed(tmp_path, placement):
    """A batch that runs past the deadline: the front's deadline through the workers, the
    instance's own in a front (no front waits on a link there)."""
    with Server("--model", str(slow_model(tmp_path / "slow.onnx")), "--timeout-ms", "50",
                "--batch-check-every", "0", "--placement", placement) as s:
        assert_error(s.url, infer_body([np.zeros((2, 4), np.float32)]), 504, E.DeadlineExceeded,
                     "no result within --timeout-ms 50")
        assert s.stats()["expired"] == 1 and s.stats()["errors"] == {"DeadlineExceeded": 1}
        eventually(lambda: s.stats()["batches"] >= 1, 120, "the long batch to finish")
    with Server("--model", str(slow_model(tmp_path / "slow.onnx")), "--timeout-ms", "60000",
                "--batch-check-every", "0") as s, Client(s.url) as c:   # no deadline: served
        np.testing.assert_array_equal(c.execute(np.ones((2, 4), np.float32)), 1)


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
