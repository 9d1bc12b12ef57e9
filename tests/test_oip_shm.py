"""System shared memory (--shm-clients): tensors handed over by reference, by Triton's
own shared-memory utilities (tritonclient.utils.shared_memory, unmodified), and every
hostile register or reference refused with a clear error while the server serves on."""
import os

import grpc
import numpy as np
import pytest
import tritonclient.grpc as gc
import tritonclient.http as hc
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from gpserve.testing import Server, eventually, free_port

KEY = f"/gpserve-test-{os.getpid()}"      # refused: gpserve-* are the server's own
TAG = f"gptest{os.getpid()}"


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with Server("--model", "standin:0,0", "--placement", "workers", "--workers", "1",
                "--shm-clients", "--grpc-listen", f"127.0.0.1:{port}") as s:
        s.grpc = f"127.0.0.1:{port}"
        yield s


@pytest.fixture
def region():
    """A factory of client regions, destroyed after the test."""
    made = []

    def make(name: str, nbytes: int):
        h = shm.create_shared_memory_region(name, f"/{TAG}-{name}", nbytes)
        made.append(h)
        return h, f"/{TAG}-{name}"
    yield make
    for h in made:
        shm.destroy_shared_memory_region(h)


def client(s) -> hc.InferenceServerClient:
    return hc.InferenceServerClient(s.url.removeprefix("http://"))


def test_inputs_and_outputs_by_reference_http_and_grpc(server, region):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    h_in, key_in = region("in", 2 * x.nbytes)           # two tensors, at two offsets
    h_out, key_out = region("out", x.nbytes)
    shm.set_shared_memory_region(h_in, [x], offset=0)
    shm.set_shared_memory_region(h_in, [x + 1], offset=x.nbytes)
    c = client(server)
    c.register_system_shared_memory("in", key_in, 2 * x.nbytes)
    c.register_system_shared_memory("out", key_out, x.nbytes)
    try:
        status = {r["name"]: r for r in c.get_system_shared_memory_status()}
        assert status["in"] == {"name": "in", "key": key_in, "offset": 0,
                                "byte_size": 2 * x.nbytes}
        for offset, want in ((0, 2 * x), (x.nbytes, 2 * (x + 1))):
            inp = hc.InferInput("x", [8, 16], "FP32")
            inp.set_shared_memory("in", x.nbytes, offset=offset)
            out = hc.InferRequestedOutput("y")
            out.set_shared_memory("out", x.nbytes)
            r = c.infer("standin", [inp], outputs=[out])
            assert r.get_output("y")["parameters"] == {"shared_memory_region": "out",
                                                       "shared_memory_byte_size": x.nbytes}
            np.testing.assert_array_equal(
                shm.get_contents_as_numpy(h_out, np.float32, [8, 16]), want)
        # gRPC: the same regions (registered over HTTP; test_triton_surface.py registers
        # over gRPC), input by reference, output back in the response
        g = gc.InferenceServerClient(server.grpc)
        inp = gc.InferInput("x", [8, 16], "FP32")
        inp.set_shared_memory("in", x.nbytes, offset=x.nbytes)
        got = g.infer("standin", [inp]).as_numpy("y")
        np.testing.assert_array_equal(got, 2 * (x + 1))
        out = gc.InferRequestedOutput("y")
        out.set_shared_memory("out", x.nbytes)
        inp = gc.InferInput("x", [8, 16], "FP32")
        inp.set_data_from_numpy(x)
        g.infer("standin", [inp], outputs=[out])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [8, 16]),
                                      2 * x)
        # a tensor larger than the request that names it: [1024, 16] in one region
        big = np.arange(1024 * 16, dtype=np.float32).reshape(1024, 16)
        h_big, key_big = region("big", big.nbytes)
        shm.set_shared_memory_region(h_big, [big])
        c.register_system_shared_memory("big", key_big, big.nbytes)
        inp = hc.InferInput("x", [1024, 16], "FP32")
        inp.set_shared_memory("big", big.nbytes)
        np.testing.assert_array_equal(c.infer("standin", [inp]).as_numpy("y"), 2 * big)
    finally:
        c.unregister_system_shared_memory()
    assert c.get_system_shared_memory_status() == []


def refused(call, *words):
    with pytest.raises(InferenceServerException) as e:
        call()
    for w in words:
        assert w in str(e.value), str(e.value)


UNUSABLE = "cannot be used as a shared-memory region"


def test_hostile_register_calls(server, region):
    """Every key that cannot be used gets the same answer, whatever the reason: nothing
    is learnt about files that were never registered."""
    c = client(server)
    h, key = region("small", 64)
    refused(lambda: c.register_system_shared_memory("a", f"/{TAG}-absent", 64), UNUSABLE)
    refused(lambda: c.register_system_shared_memory("a", key, 64, offset=8), "past the end")
    refused(lambda: c.register_system_shared_memory("a", key, 65), "past the end")
    refused(lambda: c.register_system_shared_memory("a", "/../../etc/passwd", 8),
            "directly under /dev/shm")
    refused(lambda: c.register_system_shared_memory("a", KEY, 8), UNUSABLE)
    link = f"/dev/shm/{TAG}-link"
    os.symlink(f"/dev/shm{key}", link)
    try:
        refused(lambda: c.register_system_shared_memory("a", f"/{TAG}-link", 8), UNUSABLE)
    finally:
        os.unlink(link)
    if os.getuid() == 0:               # a region of another user (root can make one)
        other = f"/dev/shm/{TAG}-other"
        with open(other, "wb") as f:
            f.write(bytes(64))
        os.chown(other, 65534, 65534)
        try:
            refused(lambda: c.register_system_shared_memory("a", f"/{TAG}-other", 8),
                    UNUSABLE)
        finally:
            os.unlink(other)
    c.register_system_shared_memory("a", key, 64)
    refused(lambda: c.register_system_shared_memory("a", key, 64), "already registered")
    refused(lambda: c.get_system_shared_memory_status("nope"), "no registered region")
    refused(lambda: c.unregister_system_shared_memory("nope"), "no registered region")
    # references past the region, or of the wrong size
    for nbytes, offset, words in ((64, 8, "past the end of region 'a'"),
                                  (32, 0, "binary_data_size is 32"),
                                  (64, -1, "non-negative"),
                                  (64, 2**62, "below 2**62"),              # CVE-2024-0088
                                  (2**64 - 8, 16, "below 2**62"),          # offset + size wraps
                                  (64, 2**64 - 1, "below 2**62")):
        inp = hc.InferInput("x", [1, 16], "FP32")
        inp.set_shared_memory("a", nbytes, offset=offset)
        refused(lambda inp=inp: c.infer("standin", [inp]), words)
    # the file shrinks, or is replaced, after it was registered
    os.truncate(f"/dev/shm{key}", 16)
    inp = hc.InferInput("x", [1, 16], "FP32")
    inp.set_shared_memory("a", 64)
    refused(lambda: c.infer("standin", [inp]), "ended after 16 of 64 bytes")
    os.unlink(f"/dev/shm{key}")
    with open(f"/dev/shm{key}", "wb") as f:
        f.write(bytes(64))
    refused(lambda: c.infer("standin", [inp]), "was replaced")
    os.unlink(f"/dev/shm{key}")
    refused(lambda: c.infer("standin", [inp]), "is gone or no longer usable")
    with open(f"/dev/shm{key}", "wb") as f:          # put back for the fixture to destroy
        f.write(bytes(64))
    c.unregister_system_shared_memory("a")
    x = np.ones((1, 16), np.float32)
    inp = hc.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("standin", [inp]).as_numpy("y"), 2 * x)


@pytest.mark.parametrize("again", [False, True])
def test_an_output_region_unregistered_or_registered_again_while_a_request_runs(again):
    """The output region goes away while the request runs (and, with ``again``, its name
    is registered again to another file, where the output used to land): the request is
    answered with an error naming the region, nothing is written, and the server serves
    on."""
    x = np.ones((1, 16), np.float32)
    with Server("--model", "standin:400,0", "--placement", "workers", "--workers", "1",
                "--shm-clients") as s:
        c = hc.InferenceServerClient(s.url.removeprefix("http://"), concurrency=2)
        first = shm.create_shared_memory_region("o1", f"/{TAG}-first", x.nbytes)
        second = shm.create_shared_memory_region("o2", f"/{TAG}-second", x.nbytes)
        try:
            c.register_system_shared_memory("o", f"/{TAG}-first", x.nbytes)
            inp = hc.InferInput("x", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            out = hc.InferRequestedOutput("y")
            out.set_shared_memory("o", x.nbytes)
            pending = c.async_infer("standin", [inp], outputs=[out])
            eventually(lambda: s.stats()["queued_rows"] >= 1, 10, "the request running")
            c.unregister_system_shared_memory("o")
            if again:
                c.register_system_shared_memory("o", f"/{TAG}-second", x.nbytes)
            refused(pending.get_result, "registered again while the request ran" if again
                    else "no registered region 'o'")
            for h in (first, second):
                assert shm.get_contents_as_numpy(h, np.float32, [16]).tolist() == [0.0] * 16
            np.testing.assert_array_equal(c.infer("standin", [inp]).as_numpy("y"), 2 * x)
        finally:
            c.unregister_system_shared_memory()
            shm.destroy_shared_memory_region(first)
            shm.destroy_shared_memory_region(second)


def test_off_unless_asked():
    with Server("--model", "echo") as s:
        c = client(s)
        refused(lambda: c.register_system_shared_memory("a", "/x", 8), "--shm-clients")
        refused(c.get_system_shared_memory_status, "--shm-clients")
        assert "system_shared_memory" not in c.get_server_metadata()["extensions"]


def test_grpc_status_codes_for_bad_references(server):
    g = gc.InferenceServerClient(server.grpc)
    inp = gc.InferInput("x", [1, 16], "FP32")
    inp.set_shared_memory("nowhere", 64)
    with pytest.raises(InferenceServerException) as e:
        g.infer("standin", [inp])
    assert "no registered region 'nowhere'" in str(e.value)
    assert e.value.status() == str(grpc.StatusCode.NOT_FOUND)


def test_output_region_too_small_or_unsized(server, region):
    """An output asked into a region smaller than it, or with no byte size: a clear
    error over HTTP and gRPC, nothing written."""
    h, key = region("tiny", 16)
    c = client(server)
    c.register_system_shared_memory("tiny", key, 16)
    try:
        x = np.ones((1, 16), np.float32)
        inp = hc.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        out = hc.InferRequestedOutput("y")
        out.set_shared_memory("tiny", 16)
        refused(lambda: c.infer("standin", [inp], outputs=[out]),
                "the output has 64 bytes; its shared_memory_byte_size is 16")
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))
        req = pb.ModelInferRequest(model_name="standin", inputs=[
            pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
            raw_input_contents=[x.tobytes()],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y")])
        req.outputs[0].parameters["shared_memory_region"].string_param = "tiny"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shared_memory_byte_size must be a non-negative integer" in e.value.details()
        assert shm.get_contents_as_numpy(h, np.float32, [4]).tolist() == [0.0] * 4
    finally:
        c.unregister_system_shared_memory("tiny")


def test_long_and_unusual_region_names(server, region):
    """Names of up to 255 characters (any but "/", which a URL path cannot carry), each
    its own region."""
    h, key = region("names", 64)
    c = client(server)
    names = ["r" * 255, "r" * 254 + "s", "\u00e9..\\ x"]
    try:
        for n in names:
            c.register_system_shared_memory(n, key, 64)
        assert sorted(r["name"] for r in c.get_system_shared_memory_status()) == \
            sorted(names)
        assert c.get_system_shared_memory_status(names[1])[0]["name"] == names[1]
        refused(lambda: c.register_system_shared_memory("r" * 256, key, 64), "1 to 255")
    finally:
        c.unregister_system_shared_memory()


def test_the_server_s_own_segments_under_another_name_and_huge_registrations(server):
    """A hard link with another name to the server's arena was accepted (its regions hold
    other clients' requests); registration offsets and sizes past 2**62 are refused."""
    c = client(server)
    arena = next(p for p in server.segments() if "front0" in p)
    link = f"/dev/shm/{TAG}-alias"
    os.link(f"/dev/shm/{arena}", link)
    try:
        refused(lambda: c.register_system_shared_memory("alias", f"/{TAG}-alias", 64),
                UNUSABLE)
    finally:
        os.unlink(link)
    h = shm.create_shared_memory_region("big", f"/{TAG}-big", 128)
    try:
        for offset, size in ((2**63, 8), (8, 2**64), (2**62, 0)):
            refused(lambda offset=offset, size=size: c.register_system_shared_memory(
                "big", f"/{TAG}-big", size, offset=offset), "below 2**62")
        refused(lambda: c.register_system_shared_memory(                 # no wrap-around
            "big", f"/{TAG}-big", 2**62 - 1, offset=2**62 - 1), "past the end")
        c.register_system_shared_memory("big", f"/{TAG}-big", 64, offset=64)
        x = np.arange(16, dtype=np.float32)
        shm.set_shared_memory_region(h, [np.zeros(16, np.float32), x])   # bytes 64..128: x
        inp = hc.InferInput("x", [1, 16], "FP32")
        inp.set_shared_memory("big", 64)               # the registration's offset, once
        np.testing.assert_array_equal(c.infer("standin", [inp]).as_numpy("y"), [2 * x])
        inp.set_shared_memory("big", 64, offset=64)    # 64 + 64 past the 64 registered
        refused(lambda: c.infer("standin", [inp]), "past the end of region 'big'")
    finally:
        c.unregister_system_shared_memory("big")
        shm.destroy_shared_memory_region(h)


def test_restricted_shared_memory_api_needs_the_header_over_rest_and_grpc():
    port = free_port()
    with Server("--model", "standin:0,0", "--placement", "workers", "--workers", "1",
                "--shm-clients", "--restricted-api", "shared-memory:admin-key=s3cret",
                "--grpc-listen", f"127.0.0.1:{port}") as s:
        c, ok = client(s), {"admin-key": "s3cret"}
        h = shm.create_shared_memory_region("r", f"/{TAG}-restricted", 64)
        try:
            for headers in (None, {"admin-key": "wrong"}, {"other": "s3cret"}):
                refused(lambda headers=headers: c.register_system_shared_memory(
                    "r", f"/{TAG}-restricted", 64, headers=headers), "[403]", "'admin-key'")
                refused(lambda headers=headers: c.get_system_shared_memory_status(
                    headers=headers), "[403]")
                refused(lambda headers=headers: c.unregister_system_shared_memory(
                    headers=headers), "[403]")
            assert "s3cret" not in s.output()
            c.register_system_shared_memory("r", f"/{TAG}-restricted", 64, headers=ok)
            assert [r["name"] for r in c.get_system_shared_memory_status(headers=ok)] == ["r"]
            x = np.ones((1, 16), np.float32)
            shm.set_shared_memory_region(h, [x])
            inp = hc.InferInput("x", [1, 16], "FP32")
            inp.set_shared_memory("r", 64)
            refused(lambda: c.infer("standin", [inp]), "[403]")     # reading it is the API
            np.testing.assert_array_equal(
                c.infer("standin", [inp], headers=ok).as_numpy("y"), 2 * x)
            g = gc.InferenceServerClient(f"127.0.0.1:{port}")
            ginp = gc.InferInput("x", [1, 16], "FP32")
            ginp.set_shared_memory("r", 64)
            with pytest.raises(InferenceServerException) as e:
                g.infer("standin", [ginp])
            assert e.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
            np.testing.assert_array_equal(
                g.infer("standin", [ginp], headers=ok).as_numpy("y"), 2 * x)
            for call in (lambda h: g.register_system_shared_memory(         # gRPC's calls
                             "r2", f"/{TAG}-restricted", 64, headers=h),
                         lambda h: g.get_system_shared_memory_status(headers=h),
                         lambda h: g.unregister_system_shared_memory("r2", headers=h)):
                with pytest.raises(InferenceServerException) as e:
                    call({"admin-key": "wrong"})
                assert e.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
                assert "'admin-key'" in e.value.message()
                call(ok)
            plain = hc.InferInput("x", [1, 16], "FP32")       # other calls: no header
            plain.set_data_from_numpy(x)
            np.testing.assert_array_equal(c.infer("standin", [plain]).as_numpy("y"), 2 * x)
        finally:
            c.unregister_system_shared_memory(headers=ok)
            shm.destroy_shared_memory_region(h)
