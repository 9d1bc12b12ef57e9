"""String tensors reach the model as its runtime expects them, through every protocol,
and come back byte-exact (ONNX Runtime: UTF-8 text; bytes that are not UTF-8 are the
client's error, naming the input).

The models are built here with ``onnx.helper``: an identity over ``tensor(string)`` and a
``Cast`` from string to int32. Served with ``--placement workers`` (strings through the
front's shared memory into a worker) and in the fronts (the default for a cheap model).
"""
import grpc
import numpy as np
import pytest
import tritonclient.grpc as gc
import tritonclient.http as hc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from gpserve import errors as E
from gpserve.client import Client
from gpserve.testing import Server, free_port

# NUL inside and at the end, multi-byte UTF-8 (2, 3 and 4 bytes), empty, plain ASCII.
TEXT = [b"hello", b"a\x00b", "\u00e9t\u00e9 \u65e5\u672c \U0001F600".encode(), b"", b"x\x00"]
NOT_UTF8 = [b"ok", b"caf\xe9", b"\xff\xfe"]       # Latin-1, and bytes no UTF-8 starts with


def _model(path, node, out_type):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 1])],
        [helper.make_tensor_value_info("o", out_type, ["N", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module", params=["workers", "fronts"])
def text_server(request, tmp_path_factory):
    path = _model(tmp_path_factory.mktemp("m") / "text.onnx",
                  helper.make_node("Identity", ["s"], ["o"]), TensorProto.STRING)
    port = free_port()
    with Server("--model", str(path), "--placement", request.param, "--fronts", "1",
                "--grpc-listen", f"127.0.0.1:{port}") as s:
        s.grpc = f"127.0.0.1:{port}"
        yield s


@pytest.fixture(scope="module")
def cast_server(tmp_path_factory):
    path = _model(tmp_path_factory.mktemp("m") / "number.onnx",
                  helper.make_node("Cast", ["s"], ["o"], to=TensorProto.INT32),
                  TensorProto.INT32)
    with Server("--model", str(path), "--placement", "workers", "--fronts", "1") as s:
        yield s


def _column(items) -> np.ndarray:
    arr = np.empty((len(items), 1), dtype=object)
    arr[:, 0] = items
    return arr


def _as_bytes(arr: np.ndarray) -> list[bytes]:
    return [x.encode() if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]


def test_graphpipe_strings_round_trip_byte_exact(text_server):
    with Client(text_server.url) as c:
        out = c.execute(_column(TEXT))
    assert out.shape == (len(TEXT), 1)
    assert _as_bytes(out) == TEXT


def test_graphpipe_1_0_4_client_strings(text_server, graphpipe):
    # graphpipe 1.0.4 decodes String outputs into a numpy 'S' array, which drops
    # trailing NULs: that is the client's own limit, so no string here ends in one.
    sent = [t for t in TEXT if not t.endswith(b"\x00")]
    out = graphpipe.one("execute", text_server.url, _column(sent))
    assert [bytes(x) for x in out.reshape(-1)] == sent


def test_v2_json_binary_and_grpc_strings(text_server):
    http = hc.InferenceServerClient(text_server.url.removeprefix("http://"))
    for binary in (False, True):
        inp = hc.InferInput("s", [len(TEXT), 1], "BYTES")
        inp.set_data_from_numpy(_column(TEXT), binary_data=binary)
        r = http.infer("text", [inp], outputs=[hc.InferRequestedOutput("o",
                                                                        binary_data=binary)])
        assert _as_bytes(r.as_numpy("o")) == TEXT, binary
    g = gc.InferenceServerClient(text_server.grpc)
    inp = gc.InferInput("s", [len(TEXT), 1], "BYTES")
    inp.set_data_from_numpy(_column(TEXT))               # bytes_contents, raw on the wire
    r = g.infer("text", [inp])
    assert _as_bytes(r.as_numpy("o")) == TEXT


def test_strings_that_are_not_utf8_are_a_clear_400_naming_the_input(text_server):
    with Client(text_server.url) as c:
        with pytest.raises(E.InvalidString) as info:
            c.execute(_column(NOT_UTF8))
        assert info.value.http_status == 400
        assert "input 's'" in info.value.message and "element 1" in info.value.message
        assert "not valid UTF-8" in info.value.message
        assert _as_bytes(c.execute(_column(TEXT))) == TEXT       # and it goes on serving
    http = hc.InferenceServerClient(text_server.url.removeprefix("http://"))
    inp = hc.InferInput("s", [len(NOT_UTF8), 1], "BYTES")
    inp.set_data_from_numpy(_column(NOT_UTF8), binary_data=True)
    with pytest.raises(InferenceServerException) as info:
        http.infer("text", [inp])
    assert info.value.status() == "400" and "not valid UTF-8" in info.value.message()
    g = gc.InferenceServerClient(text_server.grpc)
    inp = gc.InferInput("s", [len(NOT_UTF8), 1], "BYTES")
    inp.set_data_from_numpy(_column(NOT_UTF8))
    with pytest.raises(InferenceServerException) as info:
        g.infer("text", [inp])
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "input 's'" in info.value.message()


def test_strings_reach_a_cast_as_text(cast_server, graphpipe):
    numbers = [b"42", b"-7", b"0", b"2147483647"]
    with Client(cast_server.url) as c:
        out = c.execute(_column(numbers))
        assert out.dtype == np.int32
        assert out.reshape(-1).tolist() == [42, -7, 0, 2147483647]
        with pytest.raises(E.InvalidString):
            c.execute(_column([b"1", b"\xff"]))
    out = graphpipe.one("execute", cast_server.url, _column([b"12", b"-3"]))
    assert out.reshape(-1).tolist() == [12, -3]


def test_tensorflow_takes_the_bytes_as_they_are(tmp_path):
    """tf.string is bytes: every element reaches TensorFlow unchanged, UTF-8 or not, and
    comes back byte-exact (no text check for this backend)."""
    tf = pytest.importorskip("tensorflow")
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.string, [None, 1], name="s")
        tf.identity(x, name="o")
    path = tmp_path / "text.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    sent = TEXT + NOT_UTF8
    with Server("--model", str(path), "--fronts", "1") as s, Client(s.url) as c:
        assert _as_bytes(c.execute(_column(sent))) == sent
