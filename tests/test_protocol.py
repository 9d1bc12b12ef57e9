"""The codec on its own: round trips, zero-copy views, alignment, and other producers' layouts."""
import flatbuffers
import numpy as np
import pytest
from fbuild import finish_request, tensor_table

from gpserve import protocol as P
from gpserve.errors import ProtocolError, UnsupportedRequest

ALL_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
              "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3), (4, 5, 6)])
def test_round_trip_every_type_and_shape(dtype, shape):
    arr = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    req = P.decode_request(P.encode_request(P.InferRequest([arr, arr], ["a", "b"], ["y"], "c")))
    assert req.input_names == ["a", "b"] and req.output_names == ["y"] and req.config == "c"
    for got in req.inputs:
        assert got.dtype == np.dtype(dtype) and got.shape == shape
        np.testing.assert_array_equal(got, arr)
    resp = P.decode_response(P.encode_response(P.InferResponse([arr])))
    np.testing.assert_array_equal(resp.outputs[0], arr)


def test_strings_are_bytes_any_content():
    arr = np.array([[b"", b"\x00\xff\x00"], ["unicode \u2713", b"x" * 300]], dtype=object)
    out = P.decode_request(P.encode_request(P.InferRequest([arr]))).inputs[0]
    assert out.shape == (2, 2) and out.dtype == object
    assert out.tolist() == [[b"", b"\x00\xff\x00"], ["unicode \u2713".encode(), b"x" * 300]]
    scalar = P.decode_request(P.encode_request(P.InferRequest([np.array(b"one", dtype=object)])))
    assert scalar.inputs[0].shape == () and scalar.inputs[0][()] == b"one"
    fixed = P.decode_request(P.encode_request(P.InferRequest([np.array(["ab", "c"])]))).inputs[0]
    assert fixed.tolist() == [b"ab", b"c"]


@pytest.mark.parametrize("shape", [(1, 16), (64, 1024)])  # small path and large path
def test_decode_is_a_view_of_the_buffer(shape):
    arr = np.random.default_rng(1).random(shape, dtype=np.float32)
    body = bytes(P.encode_request(P.InferRequest([arr])))
    got = P.decode_request(body).inputs[0]
    assert np.shares_memory(got, np.frombuffer(body, np.uint8))
    assert got.flags.aligned and not got.flags.writeable
    np.testing.assert_array_equal(got, arr)


def test_encoder_aligns_data_to_16_bytes():
    for dtype in ALL_DTYPES:
        arr = np.ones((5, 7), dtype)
        body = np.frombuffer(bytes(P.encode_request(P.InferRequest([arr], ["input"]))), np.uint8)
        got = P.decode_request(body).inputs[0]
        offset = got.__array_interface__["data"][0] - body.__array_interface__["data"][0]
        assert offset % 16 == 0


def test_misaligned_data_is_copied_and_correct():
    arr = np.arange(12, dtype=np.float64)
    body = bytes(P.encode_request(P.InferRequest([arr])))
    shifted = bytearray(len(body) + 1)
    shifted[1:] = body
    got = P.decode_request(memoryview(shifted)[1:]).inputs[0]
    assert got.flags.aligned
    assert not np.shares_memory(got, np.frombuffer(shifted, np.uint8))
    np.testing.assert_array_equal(got, arr)


def test_encoder_takes_non_contiguous_and_big_endian_arrays():
    base = np.arange(4096 * 40, dtype=">f8").reshape(4096, 40)
    for arr in (base[:, ::3], base[::2].T, base[:10, :4]):
        got = P.decode_request(P.encode_request(P.InferRequest([arr]))).inputs[0]
        assert got.dtype == np.dtype("<f8")
        np.testing.assert_array_equal(got, arr)


def test_encoder_rejects_types_graphpipe_lacks():
    with pytest.raises(TypeError, match="bool"):
        P.encode_request(P.InferRequest([np.array([True])]))
    with pytest.raises(TypeError, match="bytes or str"):
        P.encode_request(P.InferRequest([np.array([1, "a"], dtype=object)]))


def test_metadata_round_trip():
    meta = P.MetadataResponse("m", "2", "gpserve", "desc",
                              [P.IOMetadata("x", [-1, 3], np.dtype("float32"), "in")],
                              [P.IOMetadata("s", [-1], np.dtype(object)),
                               P.IOMetadata("n", [], None)])
    assert P.decode_metadata_response(P.encode_metadata_response(meta)) == meta
    assert isinstance(P.decode_request(P.encode_request(P.MetadataRequest())), P.MetadataRequest)


def test_error_response_round_trip():
    resp = P.decode_response(P.encode_error(9, "queue full: 10 rows queued, limit 8"))
    assert resp.outputs == [] and resp.errors == [P.Error(9, "queue full: 10 rows queued, limit 8")]


def _flatbuffers_request(tensors, names) -> bytes:
    b = flatbuffers.Builder(1024)
    tables = [tensor_table(b, P.type_of(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())
              for a in tensors]
    return finish_request(b, tables, names)


def test_decodes_messages_from_the_flatbuffers_builder():
    """Its layout differs from ours: vtables after tables, shared, absent default fields."""
    tensors = [np.arange(6, dtype=np.int32).reshape(2, 3), np.ones((2, 2), np.float32),
               np.arange(3, dtype=np.int32)]
    req = P.decode_request(_flatbuffers_request(tensors, ["a", "b", "c"]))
    assert req.input_names == ["a", "b", "c"] and req.config == "" and req.output_names == []
    for got, want in zip(req.inputs, tensors):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("body, message", [
    (b"", "too short"),
    (b"\x00" * 7, "too short"),
    (b"\xff\xff\xff\x7f" + b"\x00" * 8, "past the end"),
])
def test_garbage_is_a_protocol_error(body, message):
    with pytest.raises(ProtocolError, match=message):
        P.decode_request(body)


def _tensor_body(ttype, shape, data):
    """A request whose single tensor says whatever we like (for lying messages)."""
    b = flatbuffers.Builder(256)
    return finish_request(b, [tensor_table(b, ttype, shape, data)])


@pytest.mark.parametrize("ttype, shape, data, message", [
    (10, [2, 3], bytes(20), "needs 24 data bytes, has 20"),
    (10, [-1, 3], b"", "negative dimension"),
    (0, [1], bytes(4), "not a valid tensor type"),
    (13, [1], bytes(4), "not a valid tensor type"),
    (8, [1 << 40, 1 << 40], b"", "too many elements"),
    (10, [1] * 33, bytes(4), "rank 33"),
    (12, [2], b"ab", "String tensor carries 2 bytes"),
])
def test_lying_tensors_are_protocol_errors(ttype, shape, data, message):
    with pytest.raises(ProtocolError, match=message):
        P.decode_request(_tensor_body(ttype, shape, data))


def test_zero_sized_dimension_with_huge_neighbour_is_refused():
    """An empty tensor may not claim more rows (or any dimension) than its message has
    bytes: [1e11, 3, 0, 192] in 152 bytes once pinned a front in a per-row loop."""
    assert P.decode_request(_tensor_body(10, [0, 5], b"")).inputs[0].shape == (0, 5)
    assert P.decode_request(_tensor_body(10, [3, 0], b"")).inputs[0].shape == (3, 0)
    for shape in ([0, 1 << 40], [10 ** 11, 3, 0, 192]):
        with pytest.raises(ProtocolError, match="no elements but a dimension larger than"):
            P.decode_request(_tensor_body(10, shape, b""))


def test_aliased_strings_cost_their_overhead():
    """Every String element counts 8 bytes against the message size, so millions of
    entries aliased to one empty string are refused before any is read; --max-strings
    bounds honest ones."""
    from gpserve.protocol.encode import encode_request
    honest = np.array([b""] * 1000, dtype=object)
    body = bytes(encode_request(P.InferRequest([honest])))
    assert P.decode_request(body).inputs[0].shape == (1000,)
    with pytest.raises(ProtocolError, match="more String elements than this server takes"):
        P.decode_request(body, max_strings=999)
    assert P.decode_request(body, max_strings=1000).inputs[0].shape == (1000,)
    b = flatbuffers.Builder(0)
    one = b.CreateString("")
    n = 100_000                                    # 400 KB of offsets, all to one string
    aliased = finish_request(b, [tensor_table(b, 12, [n], strings=[one] * n)])
    with pytest.raises(ProtocolError, match="more bytes than the message holds"):
        P.decode_request(aliased)


def test_unknown_union_tag_is_unsupported_request():
    body = bytearray(P.encode_request(P.MetadataRequest()))
    # Find the req_type byte by decoding the vtable of the root table.
    root = int.from_bytes(body[0:4], "little")
    vtable = root - int.from_bytes(body[root:root + 4], "little", signed=True)
    field = int.from_bytes(body[vtable + 4:vtable + 6], "little")
    for tag, kind in ((0, UnsupportedRequest), (7, UnsupportedRequest)):
        body[root + field] = tag
        with pytest.raises(kind, match=f"req_type is {tag}"):
            P.decode_request(bytes(body))
    assert issubclass(UnsupportedRequest, ProtocolError) and UnsupportedRequest.code == 2


def test_response_templates_give_the_bytes_a_fresh_build_gives():
    """A response made from a cached layout is byte for byte the one built field by
    field, whatever the data: contiguous or not, big-endian, several outputs."""
    from gpserve.protocol import encode as E
    rng = np.random.default_rng(5)
    layouts = [
        lambda: [rng.standard_normal((1, 16)).astype(np.float32)],
        lambda: [rng.integers(-9, 9, (3, 4)), rng.standard_normal((2,)).astype(">f8")],
        lambda: [rng.standard_normal((4, 6)).astype(np.float32)[:, ::2]],
        lambda: [rng.integers(0, 255, (5, 1, 2), dtype=np.uint8),
                 rng.standard_normal((1,)).astype(np.float16)],
    ]
    for make in layouts:
        for _ in range(3):
            outputs = make()
            cached = bytes(P.encode_response(P.InferResponse(outputs)))
            E._TEMPLATES.clear()
            fresh = bytes(P.encode_response(P.InferResponse(outputs)))
            assert cached == fresh
            for got, want in zip(P.decode_response(cached).outputs, outputs):
                np.testing.assert_array_equal(got, want)
            P.encode_response(P.InferResponse(make()))     # leave a template behind
