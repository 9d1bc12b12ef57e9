"""Property and fuzz tests: round trips hold, and broken messages only ever raise ProtocolError.

Allocation bound: tracemalloc (numpy reports its buffers to it) measures the peak
memory a decode takes; a hostile message may never make the decoder allocate more
than a small constant times its own size.
"""
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpserve import protocol as P
from gpserve.errors import ProtocolError

DTYPES = [np.dtype(d) for d in ("uint8", "int8", "uint16", "int16", "uint32", "int32",
                                "uint64", "int64", "float16", "float32", "float64")]

numeric_arrays = st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(
    dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    elements=hnp.from_dtype(dt, allow_nan=False)))
string_arrays = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4).flatmap(
    lambda shape: st.lists(st.binary(max_size=12), min_size=int(np.prod(shape)),
                           max_size=int(np.prod(shape))).map(
        lambda items, shape=shape: _object_array(items, shape)))
arrays = st.one_of(numeric_arrays, string_arrays)
names = st.lists(st.text(max_size=10), max_size=4)


def _object_array(items, shape):
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def _equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        np.testing.assert_array_equal(a, b)


@given(st.lists(arrays, max_size=4), names, names, st.text(max_size=20))
@settings(max_examples=300, deadline=None)
def test_request_round_trip(tensors, input_names, output_names, config):
    req = P.decode_request(P.encode_request(
        P.InferRequest(tensors, input_names, output_names, config)))
    assert (req.input_names, req.output_names, req.config) == (input_names, output_names, config)
    assert len(req.inputs) == len(tensors)
    for got, want in zip(req.inputs, tensors):
        _equal(got, want)


@given(st.lists(arrays, max_size=4),
       st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.text(max_size=30)), max_size=3))
@settings(max_examples=200, deadline=None)
def test_response_round_trip(tensors, errors):
    resp = P.decode_response(P.encode_response(
        P.InferResponse(tensors, [P.Error(c, m) for c, m in errors])))
    assert [(e.code, e.message) for e in resp.errors] == errors
    for got, want in zip(resp.outputs, tensors):
        _equal(got, want)


def _seed_messages():
    rng = np.random.default_rng(0)
    return [
        bytes(P.encode_request(P.InferRequest(
            [rng.random((2, 3), dtype=np.float32), np.array([b"ab", b"c"], dtype=object),
             np.arange(4, dtype=np.int64), np.zeros((0, 2), np.uint8)],
            ["a", "b", "c", "d"], ["y", "z"], "cfg"))),
        bytes(P.encode_request(P.MetadataRequest())),
        bytes(P.encode_response(P.InferResponse([np.arange(10, dtype=np.int16)]))),
        bytes(P.encode_error(3, "unknown input")),
        bytes(P.encode_metadata_response(P.MetadataResponse(
            "m", "1", "s", "d", [P.IOMetadata("x", [-1, 2], np.dtype("float32"))], []))),
    ]


SEEDS = _seed_messages()
DECODERS = [P.decode_request, P.decode_response, P.decode_metadata_response]


def _decode_within_bounds(body: bytes):
    """Every decoder either succeeds or raises ProtocolError, within an allocation bound."""
    for decode in DECODERS:
        tracemalloc.start()
        try:
            decode(body)
        except ProtocolError:
            pass
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        # Python objects for names, shapes and tensors cost a fixed amount on top of the
        # bytes they hold; a lying length would show up here as megabytes or more.
        assert peak <= 64 * len(body) + 256 * 1024, (decode.__name__, peak, len(body))


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                     max_size=8)


@given(st.sampled_from(SEEDS), mutations)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_messages(seed, changes):
    body = bytearray(seed)
    for at, value in changes:
        body[at % len(body)] = value
    _decode_within_bounds(bytes(body))


@given(st.sampled_from(SEEDS), st.integers(0, 10**6))
@settings(max_examples=500, deadline=None)
def test_truncated_messages(seed, cut):
    _decode_within_bounds(seed[:cut % (len(seed) + 1)])


@given(st.sampled_from(SEEDS), st.sampled_from(SEEDS), st.integers(0, 10**6),
       st.integers(0, 10**6))
@settings(max_examples=500, deadline=None)
def test_spliced_messages(a, b, i, j):
    _decode_within_bounds(a[:i % (len(a) + 1)] + b[j % (len(b) + 1):])


@given(st.binary(max_size=512))
@settings(max_examples=500, deadline=None)
def test_random_bytes(body):
    _decode_within_bounds(body)


@given(st.integers(1, 2**32 - 1), st.integers(0, 200))
@settings(max_examples=300, deadline=None)
def test_lying_lengths(length, which):
    """Overwrite any 4-byte word with a large length: never a big allocation or a hang."""
    body = bytearray(SEEDS[0])
    at = (which * 4) % (len(body) - 4)
    body[at:at + 4] = length.to_bytes(4, "little")
    _decode_within_bounds(bytes(body))


def test_aliased_string_offsets_cannot_amplify():
    """Many string offsets pointing at one long string would multiply memory; refused."""
    import flatbuffers
    from fbuild import finish_request, tensor_table
    b = flatbuffers.Builder(1 << 20)
    big = b.CreateString(b"x" * 200_000)
    count = 5000
    body = finish_request(b, [tensor_table(b, 12, [count], strings=[big] * count)])
    _decode_within_bounds(body)
    try:
        P.decode_request(body)
        raise AssertionError("aliased strings were accepted")
    except ProtocolError as e:
        assert "more bytes than the message holds" in str(e)


def _outcome(body):
    try:
        req = P.decode_request(body)
    except ProtocolError as e:
        return ("error", str(e))
    if isinstance(req, P.MetadataRequest):
        return ("metadata",)
    return ("infer", req.config, req.input_names, req.output_names,
            [(a.dtype.str, a.shape, a.tobytes() if a.dtype != object else a.tolist())
             for a in req.inputs])


@given(st.sampled_from(SEEDS), mutations)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_remembered_layouts_decode_as_the_full_decoder(seed, changes):
    """The decoder answers a request laid out as one before from that layout: for any
    message, mutated anywhere (in data or in structure), that answer is the full
    decoder's, value for value and error for error."""
    from gpserve.protocol import decode as D
    _outcome(seed)                # a request seed's layout is remembered, if it has one
    body = bytearray(seed)
    for at, value in changes:
        body[at % len(body)] = value
    body = bytes(body)
    remembered = _outcome(body)
    D._LAYOUTS.clear()
    assert remembered == _outcome(body)


def test_structure_read_inside_data_is_never_remembered():
    """A layout is kept only when no byte read for structure lies in a tensor's data."""
    from gpserve.protocol import decode as D
    x = np.arange(4, dtype=np.float32)
    body = bytes(P.encode_request(P.InferRequest([x])))
    r = D._Reader(body, record=True)
    req = P.InferRequest([x], [], [], "")
    (start, nbytes), = [(s, n) for s, n in [(body.index(x.tobytes()), 16)]]
    r.data = [(start, nbytes)]
    r.read = [(0, 4), (start + 8, start + 12)]     # as if a table sat in the data
    assert D._Layout.of(r, req) is None
    r.read = [(0, 4), (start - 4, start)]          # only the length before the data
    assert D._Layout.of(r, req) is not None
