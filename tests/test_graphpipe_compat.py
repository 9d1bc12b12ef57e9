"""Byte compatibility with the unmodified graphpipe 1.0.4 package, both directions, every type."""
import numpy as np
import pytest

from gpserve import protocol as P

NUMERIC = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
           "float16", "float32", "float64"]


def sample(dtype: str, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def tensors_of_every_type():
    arrays = [sample(d, (2, 3), i) for i, d in enumerate(NUMERIC)]
    arrays += [sample("float32", ()), sample("int64", (0,)), sample("float64", (3, 0, 2))]
    # graphpipe decodes strings into numpy 'S' arrays, which drop trailing NUL bytes:
    # keep the test strings free of them on that path.
    arrays.append(np.array([[b"alpha", b"\xff\x01binary"], [b"", "caf\u00e9".encode()]],
                           dtype=object))
    return arrays


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        if a.dtype.kind in "OS" or b.dtype.kind in "OS":
            assert [bytes(x) for x in a.flat] == [bytes(x) for x in b.flat]
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_graphpipe_request_decodes_in_gpserve(graphpipe):
    arrays = tensors_of_every_type()
    names = [f"in{i}" for i in range(len(arrays))]
    body = graphpipe.one("encode_request", arrays, names, ["out0", "out1"], "my-config")
    req = P.decode_request(body)
    assert req.config == "my-config"
    assert req.input_names == names
    assert req.output_names == ["out0", "out1"]
    assert_same(req.inputs, arrays)


def test_graphpipe_request_without_names(graphpipe):
    arr = sample("float32", (4, 16))
    req = P.decode_request(graphpipe.one("encode_request", [arr], [], [], None))
    assert (req.input_names, req.output_names, req.config) == ([], [], "")
    assert_same(req.inputs, [arr])


def test_gpserve_request_decodes_in_graphpipe(graphpipe):
    arrays = tensors_of_every_type()
    names = [f"in{i}" for i in range(len(arrays))]
    body = bytes(P.encode_request(P.InferRequest(arrays, names, ["y"], "cfg")))
    config, in_names, tensors, out_names = graphpipe.one("decode_request", body)
    assert config == b"cfg" and in_names == [n.encode() for n in names] and out_names == [b"y"]
    assert_same(tensors, arrays)


def test_metadata_request_both_ways(graphpipe):
    assert isinstance(P.decode_request(graphpipe.one("encode_metadata_request")),
                      P.MetadataRequest)
    assert graphpipe.one("request_type", bytes(P.encode_request(P.MetadataRequest()))) == 2


def test_graphpipe_response_decodes_in_gpserve(graphpipe):
    """graphpipe 1.0.4 opens its errors vector with the tensor count and closes it with 0."""
    arrays = tensors_of_every_type()
    resp = P.decode_response(graphpipe.one("encode_response", arrays))
    assert resp.errors == []
    assert_same(resp.outputs, arrays)


def test_gpserve_response_decodes_in_graphpipe(graphpipe):
    arrays = tensors_of_every_type()
    tensors, errors = graphpipe.one("decode_response", bytes(P.encode_response(
        P.InferResponse(arrays))))
    assert errors == []
    assert_same(tensors, arrays)


def test_gpserve_error_response_decodes_in_graphpipe(graphpipe):
    tensors, errors = graphpipe.one("decode_response", bytes(P.encode_error(7, "bad shape")))
    assert tensors == [] and errors == [{"code": 7, "message": b"bad shape"}]


def test_metadata_response_both_ways(graphpipe):
    meta = P.MetadataResponse(
        name="cls", version="3", server="gpserve", description="text direction",
        inputs=[P.IOMetadata("x", [-1, 3, 48, 192], np.dtype("float32"), "image")],
        outputs=[P.IOMetadata("probs", [-1, 2], np.dtype("float32")),
                 P.IOMetadata("ids", [-1], np.dtype("int64"))])
    got = graphpipe.one("decode_metadata_response", bytes(P.encode_metadata_response(meta)))
    assert got["name"] == "cls" and got["version"] == "3" and got["server"] == "gpserve"
    assert got["inputs"] == [{"name": "x", "shape": [-1, 3, 48, 192], "type": 10,
                              "description": "image"}]
    assert [o["name"] for o in got["outputs"]] == ["probs", "ids"]
    assert [o["type"] for o in got["outputs"]] == [10, 8]

    theirs = {"name": "m", "version": "1", "server": "go", "description": "d",
              "inputs": [{"name": "a", "shape": [-1, 5], "type": np.dtype("int32")}],
              "outputs": [{"name": "b", "shape": [2], "type": np.dtype("float64")}]}
    decoded = P.decode_metadata_response(graphpipe.one("encode_metadata_response", theirs))
    assert (decoded.name, decoded.version, decoded.server) == ("m", "1", "go")
    assert decoded.inputs == [P.IOMetadata("a", [-1, 5], np.dtype("int32"))]
    assert decoded.outputs == [P.IOMetadata("b", [2], np.dtype("float64"))]


@pytest.mark.parametrize("dtype", NUMERIC)
def test_large_tensor_each_type_both_ways(graphpipe, dtype):
    """Above the encoder's small-message threshold the data goes through the one-copy path."""
    arr = sample(dtype, (64, 1500))
    body = graphpipe.one("encode_request", [arr], ["x"], [], "")
    assert_same(P.decode_request(body).inputs, [arr])
    tensors, _ = graphpipe.one("decode_response", bytes(P.encode_response(P.InferResponse([arr]))))
    assert_same(tensors, [arr])
