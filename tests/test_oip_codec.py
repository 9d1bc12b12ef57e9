"""The Open Inference Protocol's codec and messages, in process: framing, checks, and
wire compatibility with the messages tritonclient generates from Triton's .proto."""
import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton

from gpserve.errors import DtypeMismatch, ProtocolError
from gpserve.oip.codec import decode_infer, encode_infer
from gpserve.oip.datatypes import decode_bytes, encode_bytes
from gpserve.oip.grpc_messages import message


def body(inputs, blobs=(), **extra) -> tuple[bytes, int]:
    head = json.dumps({"inputs": inputs, **extra}).encode()
    return head + b"".join(blobs), len(head)


def test_binary_inputs_are_views_of_the_body_and_json_ones_are_typed():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw, n = body([{"name": "a", "shape": [2, 3], "datatype": "FP32",
                    "parameters": {"binary_data_size": 24}},
                   {"name": "b", "shape": [2], "datatype": "INT16", "data": [-1, 7]}],
                  [x.tobytes()], outputs=[{"name": "y", "parameters": {"binary_data": True}}],
                  id="r", parameters={"cache": False, "batch": "off", "config": "t=1"})
    buf = bytearray(raw)
    call = decode_infer(buf, n, 10, "")
    a, b = call.tensors
    np.testing.assert_array_equal(a, x)
    assert not a.flags.owndata and np.shares_memory(a, np.frombuffer(buf, np.uint8))
    assert b.dtype == np.int16 and b.tolist() == [-1, 7]
    assert call.input_names == ["a", "b"] and call.output_names == ["y"]
    assert call.binary == {"y": True} and call.id == "r"
    assert call.config == "t=1;cache=off;batch=off"


@pytest.mark.parametrize("inputs,blobs,error,words", [
    ([{"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2, 3]}], (), ProtocolError,
     "has 3 elements"),
    ([{"name": "a", "shape": [1], "datatype": "UINT8", "data": [256]}], (), ProtocolError,
     "out of UINT8's range"),
    ([{"name": "a", "shape": [1], "datatype": "INT32", "data": [1.5]}], (), DtypeMismatch,
     "fractional"),
    ([{"name": "a", "shape": [1], "datatype": "BOOL", "data": [1]}], (), DtypeMismatch,
     "true/false"),
    ([{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["x", 1]}], (), DtypeMismatch,
     "must be strings"),
    ([{"name": "a", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}], (),
     ProtocolError, "more BYTES elements than this server takes"),
    ([{"name": "a", "shape": [1], "datatype": "BOOL",
       "parameters": {"binary_data_size": 1}}], (b"\x02",), ProtocolError, "0 or 1"),
    ([{"name": "a", "shape": [1], "datatype": "FP32", "data": [1],
       "parameters": {"binary_data_size": 4}}], (bytes(4),), ProtocolError, "both"),
    ([{"name": "a", "shape": [[1]], "datatype": "FP32", "data": [1]}], (), ProtocolError,
     "'shape'"),
    ([{"name": "a", "shape": [1], "datatype": "COMPLEX", "data": [1]}], (), DtypeMismatch,
     "'COMPLEX'"),
    # numbers past a float type's range would become inf; true is no integer
    ([{"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 3.5e38]}], (),
     ProtocolError, "out of FP32's range"),
    ([{"name": "a", "shape": [1], "datatype": "FP16", "data": [70000]}], (), ProtocolError,
     "out of FP16's range"),
    ([{"name": "a", "shape": [2], "datatype": "INT32", "data": [True, 2]}], (),
     DtypeMismatch, "true/false beside numbers"),
    ([{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [[1.5, False]]}], (),
     DtypeMismatch, "true/false beside numbers"),
    ([{"name": "a", "shape": [1], "datatype": "INT32", "data": [True]}], (), DtypeMismatch,
     "true/false"),
    ([{"name": "a", "shape": [1], "datatype": "FP32", "data": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
        [[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}], (), ProtocolError, "deeper than 32"),
])
def test_malformed_inputs_are_named(inputs, blobs, error, words):
    raw, n = body(inputs, blobs)
    with pytest.raises(error, match=words) as e:
        decode_infer(raw, n if blobs else None, 2, "--max-strings")
    assert "input 'a'" in str(e.value)


def test_bytes_framing_round_trips_and_refuses_lies():
    items = np.array([b"", b"abc", "\u00e9".encode()], dtype=object)
    framed = encode_bytes(items)
    assert framed == b"\0\0\0\0\3\0\0\0abc\2\0\0\0\xc3\xa9"
    assert decode_bytes(framed, 3, "t").tolist() == items.tolist()
    with pytest.raises(ProtocolError, match="says 9 bytes"):
        decode_bytes(b"\x09\0\0\0ab", 1, "t")
    with pytest.raises(ProtocolError, match="left over"):
        decode_bytes(framed + b"x", 3, "t")
    with pytest.raises(ProtocolError, match="after 1 of 2"):
        decode_bytes(b"\0\0\0\0", 2, "t")


def test_response_json_and_binary_parts():
    x = np.array([[1.5, 2.0]], np.float32)
    s = np.array([b"hi"], dtype=object)
    raw, n = body([{"name": "a", "shape": [1], "datatype": "FP32", "data": [0]}],
                  outputs=[{"name": "x", "parameters": {"binary_data": True}},
                           {"name": "s"}], id="q")
    call = decode_infer(raw, None, 10, "")
    out, json_length = encode_infer("m", "1", call, ["x", "s"], [x, s])
    head = json.loads(out[:json_length])
    assert head["id"] == "q" and head["model_name"] == "m"
    assert head["outputs"][0] == {"name": "x", "datatype": "FP32", "shape": [1, 2],
                                  "parameters": {"binary_data_size": 8}}
    assert head["outputs"][1] == {"name": "s", "datatype": "BYTES", "shape": [1],
                                  "data": ["hi"]}
    assert out[json_length:] == x.tobytes()


def test_grpc_messages_match_tritons_on_the_wire():
    ours = message("ModelInferRequest")(model_name="m", id="i", inputs=[
        {"name": "a", "datatype": "FP32", "shape": [1, 2],
         "contents": {"fp32_contents": [1.5, -2]}}], raw_input_contents=[b"xyz"])
    ours.parameters["cache"].bool_param = False
    ours.inputs[0].parameters["shared_memory_offset"].int64_param = 8
    theirs = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "m" and theirs.inputs[0].shape == [1, 2]
    assert list(theirs.inputs[0].contents.fp32_contents) == [1.5, -2]
    assert theirs.parameters["cache"].bool_param is False
    assert theirs.inputs[0].parameters["shared_memory_offset"].int64_param == 8
    assert theirs.SerializeToString() == ours.SerializeToString()
    reply = triton.ModelInferResponse(model_name="m", raw_output_contents=[b"\x01"])
    reply.outputs.add(name="y", datatype="BOOL", shape=[1])
    back = message("ModelInferResponse").FromString(reply.SerializeToString())
    assert back.outputs[0].name == "y" and back.raw_output_contents == [b"\x01"]


def test_json_numbers_at_a_float_type_s_limits_are_kept():
    raw, _ = body([{"name": "a", "shape": [3], "datatype": "FP32",
                    "data": [-3.4028234663852886e38, 0.1, 3.4028234663852886e38]},
                   {"name": "b", "shape": [1], "datatype": "FP16", "data": [65504]},
                   {"name": "c", "shape": [1], "datatype": "BOOL", "data": [True]}])
    a, b, c = decode_infer(raw, None, 2, "").tensors
    assert np.isfinite(a).all() and a[2] == np.finfo(np.float32).max
    assert b.tolist() == [65504] and c.tolist() == [True]


def test_a_repeated_binary_header_is_decoded_from_its_plan_with_the_same_checks():
    """The second request with the same header takes its plan: the same call, views of
    its own body; a body of another size is still refused; JSON data, strings and
    booleans are never planned (their bytes are read each time)."""
    from gpserve.oip import header_cache
    header_cache._PLANS.clear()
    head = [{"name": "a", "shape": [2, 2], "datatype": "INT32",
             "parameters": {"binary_data_size": 16}},
            {"name": "b", "shape": [1], "datatype": "FP64",
             "parameters": {"binary_data_size": 8}}]
    calls = []
    for k in range(3):
        a, b = np.arange(4, dtype=np.int32) + k, np.array([k / 3])
        raw, n = body(head, [a.tobytes(), b.tobytes()], parameters={"batch": False})
        buf = bytearray(raw)
        call = decode_infer(buf, n, 10, "")
        np.testing.assert_array_equal(call.tensors[0], a.reshape(2, 2))
        np.testing.assert_array_equal(call.tensors[1], b)
        assert all(np.shares_memory(t, np.frombuffer(buf, np.uint8)) for t in call.tensors)
        calls.append(call._replace(tensors=[]))
    assert len(header_cache._PLANS) == 1 and calls[0] == calls[1] == calls[2]
    assert calls[2].config == "batch=off" and calls[2].input_names == ["a", "b"]
    with pytest.raises(ProtocolError, match="bytes after its inputs"):
        decode_infer(raw + b"\0", n, 10, "")
    with pytest.raises(ProtocolError, match="does not fit"):
        decode_infer(raw[:-1], n, 10, "")
    for inputs, blobs in (
            ([{"name": "s", "shape": [1], "datatype": "BYTES",
               "parameters": {"binary_data_size": 5}}], [b"\1\0\0\0x"]),
            ([{"name": "t", "shape": [1], "datatype": "BOOL",
               "parameters": {"binary_data_size": 1}}], [b"\1"]),
            ([{"name": "j", "shape": [1], "datatype": "FP32", "data": [2]},
              {"name": "a", "shape": [1], "datatype": "FP32",
               "parameters": {"binary_data_size": 4}}], [bytes(4)])):
        raw, n = body(inputs, blobs)
        for _ in range(2):
            assert decode_infer(raw, n, 10, "").input_names == [i["name"] for i in inputs]
    assert len(header_cache._PLANS) == 1
    with pytest.raises(ProtocolError, match="0 or 1"):     # checked on every request
        decode_infer(*body([{"name": "t", "shape": [1], "datatype": "BOOL",
                             "parameters": {"binary_data_size": 1}}], [b"\2"]), 10, "")


def test_a_binary_answer_s_remembered_header_is_the_header_made_afresh():
    from gpserve.oip import header_cache
    x, y = np.arange(3, dtype=np.float32), np.ones((2, 1), np.int64)
    raw, n = body([{"name": "x", "shape": [3], "datatype": "FP32",
                    "parameters": {"binary_data_size": 12}}], [x.tobytes()],
                  id="q", parameters={"binary_data_output": True})
    call = decode_infer(raw, n, 10, "")
    header_cache._HEADS.clear()
    first = encode_infer("m", "2", call, ["x", "y"], [x, y])
    again = encode_infer("m", "2", call, ["x", "y"], [x + 1, y])
    assert len(header_cache._HEADS) == 1
    out, length = again
    assert first[1] == length and first[0][:length] == out[:length]
    assert json.loads(out[:length]) == {
        "model_name": "m", "model_version": "2", "id": "q", "outputs": [
            {"name": "x", "datatype": "FP32", "shape": [3],
             "parameters": {"binary_data_size": 12}},
            {"name": "y", "datatype": "INT64", "shape": [2, 1],
             "parameters": {"binary_data_size": 16}}]}
    assert out[length:] == (x + 1).tobytes() + y.tobytes()
    header_cache._HEADS.clear()       # a JSON output is made afresh, never remembered
    json_call = call._replace(binary={"x": False}, binary_default=False)
    out, length = encode_infer("m", "2", json_call, ["x"], [x])
    assert length is None and json.loads(out)["outputs"][0]["data"] == [0, 1, 2]
    assert not header_cache._HEADS
