"""The Open Inference Protocol over gRPC (--grpc-listen), driven by tritonclient.grpc
(sync and aio, unmodified) and, for the typed ``contents`` no client of ours sends, by
the service stubs tritonclient ships."""
import asyncio
import socket
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as gc
import tritonclient.grpc.aio as gc_aio
from test_oip_rest import VALUES
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from gpserve.client import Client
from gpserve.testing import Server, eventually, free_port


@pytest.fixture(scope="module")
def echo():
    port = free_port()
    with Server("--model", "echo", "--grpc-listen", f"127.0.0.1:{port}") as s:
        s.grpc = f"127.0.0.1:{port}"
        yield s


@pytest.mark.parametrize("datatype", list(VALUES))
def test_echo_every_datatype_raw(echo, datatype):
    x = np.repeat(VALUES[datatype], 2, axis=0)
    c = gc.InferenceServerClient(echo.grpc)
    inp = gc.InferInput("INPUT0", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    r = c.infer("echo", [inp], outputs=[gc.InferRequestedOutput("OUTPUT0")],
                request_id="g-1")
    got = r.as_numpy("OUTPUT0")
    assert r.get_response().id == "g-1"
    assert r.get_output("OUTPUT0").datatype == datatype
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


def test_typed_contents_and_parameters(echo):
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(echo.grpc))
    req = pb.ModelInferRequest(model_name="echo", inputs=[
        pb.ModelInferRequest.InferInputTensor(
            name="a", datatype="FP32", shape=[2, 2],
            contents=pb.InferTensorContents(fp32_contents=[1.5, -2, 0, 4])),
        pb.ModelInferRequest.InferInputTensor(
            name="b", datatype="INT8", shape=[2, 1],
            contents=pb.InferTensorContents(int_contents=[-128, 127])),
        pb.ModelInferRequest.InferInputTensor(
            name="c", datatype="BYTES", shape=[2],
            contents=pb.InferTensorContents(bytes_contents=[b"x", b"\x00yz"]))])
    req.parameters["cache"].bool_param = False
    resp = stub.ModelInfer(req)
    assert [o.name for o in resp.outputs] == ["output", "output1", "output2"]
    a = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 2)
    np.testing.assert_array_equal(a, [[1.5, -2], [0, 4]])
    assert np.frombuffer(resp.raw_output_contents[1], np.int8).tolist() == [-128, 127]
    assert resp.raw_output_contents[2] == b"\x01\x00\x00\x00x\x03\x00\x00\x00\x00yz"

    def refused(req, code, words):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == code and words in e.value.details(), e.value.details()
    tensor = pb.ModelInferRequest.InferInputTensor
    refused(pb.ModelInferRequest(model_name="echo", inputs=[tensor(
        name="a", datatype="INT8", shape=[1], contents=pb.InferTensorContents(
            int_contents=[300]))]), grpc.StatusCode.INVALID_ARGUMENT, "out of INT8's range")
    refused(pb.ModelInferRequest(model_name="echo", inputs=[tensor(
        name="a", datatype="FP16", shape=[1], contents=pb.InferTensorContents(
            fp32_contents=[1]))]), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents")
    refused(pb.ModelInferRequest(model_name="echo", inputs=[tensor(
        name="a", datatype="FP32", shape=[3], contents=pb.InferTensorContents(
            fp32_contents=[1]))]), grpc.StatusCode.INVALID_ARGUMENT, "takes 3")
    refused(pb.ModelInferRequest(model_name="echo", inputs=[
        tensor(name="a", datatype="FP32", shape=[1]), tensor(name="b", datatype="FP32",
                                                             shape=[1])],
        raw_input_contents=[b"\x00" * 4]), grpc.StatusCode.INVALID_ARGUMENT,
        "1 raw_input_contents for 2 inputs")
    refused(pb.ModelInferRequest(model_name="echo", inputs=[tensor(
        name="a", datatype="FP32", shape=[2])], raw_input_contents=[b"\x00" * 4]),
        grpc.StatusCode.INVALID_ARGUMENT, "takes 8")
    refused(pb.ModelInferRequest(model_name="echo", model_version="3", inputs=[tensor(
        name="a", datatype="FP32", shape=[1])], raw_input_contents=[b"\x00" * 4]),
        grpc.StatusCode.NOT_FOUND, "'echo' version 3 is not found")
    refused(pb.ModelInferRequest(model_name="echo"), grpc.StatusCode.INVALID_ARGUMENT,
            "no inputs")


def test_routes_and_aio_client(echo):
    async def run():
        c = gc_aio.InferenceServerClient(echo.grpc)
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready("echo")
            meta = await c.get_model_metadata("echo", as_json=True)
            assert meta["name"] == "echo" and meta["versions"] == ["1"]
            server = await c.get_server_metadata(as_json=True)
            assert server["name"] == "gpserve"
            with pytest.raises(InferenceServerException,
                               match="unknown model: 'resnet' is not found"):
                await c.get_model_metadata("resnet")

            async def one(k):
                inp = gc_aio.InferInput("x", [1, 4], "INT32")
                inp.set_data_from_numpy(np.full((1, 4), k, np.int32))
                return (await c.infer("echo", [inp])).as_numpy("output")
            return await asyncio.gather(*(one(k) for k in range(24)))
        finally:
            await c.close()
    for k, got in enumerate(asyncio.run(run())):
        np.testing.assert_array_equal(got, np.full((1, 4), k, np.int32))


def test_default_model_same_answers_as_graphpipe():
    port = free_port()
    with Server("--grpc-listen", f"127.0.0.1:{port}") as s:
        name = s.info()["name"]
        x = np.array([[0.2, 0.3], [-0.5, 0.9]], np.float32)
        with Client(s.url) as gp:
            want = gp.execute(x)
        c = gc.InferenceServerClient(f"127.0.0.1:{port}")
        inp = gc.InferInput("point", [2, 2], "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer(name, [inp])
        out = r.get_response().outputs[0].name
        np.testing.assert_array_equal(r.as_numpy(out), want)
        inp = gc.InferInput("point", [2, 2], "FP64")
        inp.set_data_from_numpy(x.astype(np.float64))
        with pytest.raises(InferenceServerException, match="'point' is Float64"):
            c.infer(name, [inp])
        np.testing.assert_array_equal(c.infer(name, [gc.InferInput("point", [2, 2], "FP32")
                                                     .set_data_from_numpy(x)]).as_numpy(out),
                                      want)


def test_grpc_port_in_use_fails_at_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "gpserve", "serve", "--model", "echo", "--listen",
             f"127.0.0.1:{free_port()}", "--grpc-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cannot listen on --grpc-listen 127.0.0.1:{port}" in proc.stderr


def test_grpc_requests_counted_in_metrics(echo):
    c = gc.InferenceServerClient(echo.grpc)
    before = echo.metric("gpserve_requests_total", status="200", kind="grpc_infer")
    inp = gc.InferInput("x", [1, 2], "FP32")
    inp.set_data_from_numpy(np.ones((1, 2), np.float32))
    for _ in range(3):
        c.infer("echo", [inp])
    eventually(lambda: echo.metric("gpserve_requests_total", status="200",
                                   kind="grpc_infer") == before + 3, 10, "3 counted")


def test_a_second_server_cannot_join_a_grpc_port(echo):
    """The fronts share --grpc-listen with SO_REUSEPORT; another gpserve given the same
    port must fail at start, not silently take half its connections."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpserve", "serve", "--model", "echo", "--listen",
         f"127.0.0.1:{free_port()}", "--grpc-listen", echo.grpc],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cannot listen on --grpc-listen {echo.grpc}" in proc.stderr


def test_malformed_protobuf_is_invalid_argument(echo):
    """grpcio answers UNKNOWN ("Unexpected DecodeError") when a deserializer raises; the
    docs promise INVALID_ARGUMENT for a malformed request."""
    channel = grpc.insecure_channel(echo.grpc)
    for method in ("ModelInfer", "ModelMetadata"):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)       # a length past the end
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a well-formed" in info.value.details()
    x = np.ones((1, 2), np.float32)                             # and it goes on serving
    inp = gc.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(
        gc.InferenceServerClient(echo.grpc).infer("echo", [inp]).as_numpy("output"), x)


def test_grpc_requests_in_flight_are_bounded_per_front(tmp_path):
    """Six concurrent 200 MiB ModelInfer calls took a front to 4.9 GiB: grpcio reads each
    whole message before the call runs. A front now holds at most --grpc-inflight-mb of
    requests at once; past it, RESOURCE_EXHAUSTED, while small calls go on."""
    from test_errors import slow_model
    model = slow_model(tmp_path / "slow.onnx")           # about a second a batch
    port = free_port()
    with Server("--model", str(model), "--placement", "workers", "--fronts", "1",
                "--grpc-listen", f"127.0.0.1:{port}", "--grpc-inflight-mb", "2",
                "--max-queue", "300000", "--timeout-ms", "60000",
                "--batch-check-every", "0") as s:
        big = np.ones((100_000, 4), np.float32)           # 1.6 MB

        def call(x):
            c = gc.InferenceServerClient(f"127.0.0.1:{port}")
            inp = gc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return c.infer("slow", [inp]).as_numpy("y")
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", call(big)))
        first.start()
        eventually(lambda: s.stats()["queued_rows"] >= 100_000, 30, "the first call running")
        with pytest.raises(InferenceServerException) as e:
            call(big)                                     # 3.2 MB in flight: past 2 MiB
        assert e.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "--grpc-inflight-mb" in e.value.message()
        small = np.ones((2, 4), np.float32)
        np.testing.assert_array_equal(call(small), small)   # small calls still fit
        first.join(60)
        np.testing.assert_array_equal(results["first"], big)
        np.testing.assert_array_equal(call(big), big)       # and the big one, alone
