"""What Triton's own clients call beyond infer and metadata, with tritonclient unmodified
(HTTP, gRPC, aio): the statistics extension, the model configuration over gRPC, system
shared memory registered over gRPC, CUDA shared memory as a server without GPUs answers
it, and an unknown model worded as Triton words it."""
import asyncio
import os
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as gc
import tritonclient.grpc.aio as gc_aio
import tritonclient.http as hc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from gpserve.testing import Server, free_port

TAG = f"gptriton{os.getpid()}"
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer",
             "compute_output", "cache_hit", "cache_miss")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    with Server("--model", "standin:2,0", "--placement", "workers", "--workers", "1",
                "--cache", "--cache-dir", str(tmp_path_factory.mktemp("rows")),
                "--shm-clients", "--grpc-listen", f"127.0.0.1:{port}") as s:
        s.grpc = f"127.0.0.1:{port}"
        yield s


def http(s) -> hc.InferenceServerClient:
    return hc.InferenceServerClient(s.url.removeprefix("http://"))


def infer(c, x: np.ndarray):
    inp = hc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer("standin", [inp]).as_numpy("y")


def counts(entry: dict) -> dict:
    """The figures of one ``model_stats`` entry that a test can know exactly."""
    s = entry["inference_stats"]
    return {"inference_count": int(entry["inference_count"]),
            "execution_count": int(entry["execution_count"]),
            **{k: int(s[k]["count"]) for k in DURATIONS},
            "batches": sum(int(b["compute_infer"]["count"]) for b in entry["batch_stats"])}


def test_statistics_count_requests_batches_cache_and_failures(server):
    c = http(server)
    before = counts(c.get_inference_statistics("standin")["model_stats"][0])
    started_ms = time.time() * 1e3
    rows = np.arange(3 * 2 * 16, dtype=np.float32).reshape(3, 2, 16) + started_ms % 1000  # new rows
    for x in rows:                                    # 3 requests of 2 new rows: misses
        np.testing.assert_array_equal(infer(c, x), 2 * x)
    np.testing.assert_array_equal(infer(c, rows[1]), 2 * rows[1])   # all cached: a hit
    with pytest.raises(InferenceServerException, match="16"):       # a bad shape: failed
        infer(c, np.zeros((1, 3), np.float32))
    stats = c.get_inference_statistics("standin")["model_stats"]
    assert [(e["name"], e["version"]) for e in stats] == [("standin", "1")]
    entry, after = stats[0], counts(stats[0])
    delta = {k: after[k] - before[k] for k in after}
    # sequential requests: each its own batch of 2 rows; the hit never reaches a worker
    assert delta == {"inference_count": 6, "execution_count": 3, "success": 4, "fail": 1,
                     "queue": 3, "compute_input": 3, "compute_infer": 3,
                     "compute_output": 3, "cache_hit": 1, "cache_miss": 3, "batches": 3}
    assert started_ms - 1 <= entry["last_inference"] <= time.time() * 1e3 + 1
    s = entry["inference_stats"]
    # the stand-in sleeps 2 ms per batch: the model's time is at least that, and a
    # request's whole time in the server at least its model's
    assert int(s["compute_infer"]["ns"]) >= 2_000_000 * (before["compute_infer"] + 3)
    assert int(s["success"]["ns"]) >= int(s["compute_infer"]["ns"]) * 3 // 4
    sizes = [b["batch_size"] for b in entry["batch_stats"]]
    assert 2 in sizes and sizes == sorted(sizes)
    # gRPC and aio: the same figures (uint64 fields as numbers, not JSON strings)
    g = gc.InferenceServerClient(server.grpc).get_inference_statistics("standin")
    assert counts(_message_dict(g.model_stats[0])) == after

    async def aio():
        async with gc_aio.InferenceServerClient(server.grpc) as a:
            return await a.get_inference_statistics()        # every model: this one
    every = asyncio.run(aio())
    assert [m.name for m in every.model_stats] == ["standin"]
    assert c.get_inference_statistics()["model_stats"][0]["name"] == "standin"


def _message_dict(m) -> dict:
    from google.protobuf import json_format
    return json_format.MessageToDict(m, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def test_model_config_over_grpc_is_rest_s(server):
    rest = http(server).get_model_config("standin")
    got = gc.InferenceServerClient(server.grpc).get_model_config("standin", as_json=True)
    config = got["config"]
    assert config["name"] == rest["name"] == "standin"
    assert int(config["max_batch_size"]) == rest["max_batch_size"] == 32
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["16"]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": ["16"]}]
    assert rest["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [16]}]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == \
        rest["dynamic_batching"]["max_queue_delay_microseconds"]


def test_system_shared_memory_registered_over_grpc(server):
    g = gc.InferenceServerClient(server.grpc)
    x = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    key = f"/{TAG}-grpc"
    h = shm.create_shared_memory_region("g", key, 2 * x.nbytes)
    try:
        shm.set_shared_memory_region(h, [x])
        g.register_system_shared_memory("g-in", key, x.nbytes)
        g.register_system_shared_memory("g-out", key, x.nbytes, offset=x.nbytes)
        status = g.get_system_shared_memory_status(as_json=True)["regions"]
        assert status["g-in"] == {"name": "g-in", "key": key, "byte_size": str(x.nbytes)}
        assert status["g-out"]["offset"] == str(x.nbytes)
        # and HTTP sees what gRPC registered: one set of regions per server
        assert {r["name"] for r in http(server).get_system_shared_memory_status()} == \
            {"g-in", "g-out"}
        inp = gc.InferInput("x", [4, 16], "FP32")
        inp.set_shared_memory("g-in", x.nbytes)
        out = gc.InferRequestedOutput("y")
        out.set_shared_memory("g-out", x.nbytes)
        g.infer("standin", [inp], outputs=[out])
        got = shm.get_contents_as_numpy(h, np.float32, [8, 16])[4:]
        np.testing.assert_array_equal(got, 2 * x)
        with pytest.raises(InferenceServerException) as e:      # the name is taken
            g.register_system_shared_memory("g-in", key, x.nbytes)
        assert "already registered" in e.value.message()
        assert e.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        with pytest.raises(InferenceServerException) as e:
            g.get_system_shared_memory_status("nope")
        assert e.value.status() == str(grpc.StatusCode.NOT_FOUND)
        g.unregister_system_shared_memory("g-in")
        assert list(g.get_system_shared_memory_status(as_json=True)["regions"]) == ["g-out"]
    finally:
        g.unregister_system_shared_memory()            # every region
        shm.destroy_shared_memory_region(h)
    assert g.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


def test_cuda_shared_memory_on_a_server_without_gpus(server):
    """As a CPU-only Triton: status is empty and unregistering succeeds (clients clear
    CUDA regions first, then go on to system shared memory); only register fails."""
    c, g = http(server), gc.InferenceServerClient(server.grpc)
    assert c.get_cuda_shared_memory_status() == []
    c.unregister_cuda_shared_memory()
    c.unregister_cuda_shared_memory("any")
    assert g.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
    g.unregister_cuda_shared_memory()
    g.unregister_cuda_shared_memory("any")
    with pytest.raises(InferenceServerException) as e:
        c.register_cuda_shared_memory("r", "aGFuZGxl", 0, 64)
    assert "[400]" in str(e.value) and "system shared memory" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 64)
    assert e.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "system shared memory" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.get_cuda_shared_memory_status("r")
    assert e.value.status() == str(grpc.StatusCode.NOT_FOUND)
    extensions = c.get_server_metadata()["extensions"]
    assert "cuda_shared_memory" not in extensions
    assert {"statistics", "model_configuration", "system_shared_memory"} <= set(extensions)


@pytest.mark.parametrize("version", ["", "7"])
def test_an_unknown_model_worded_as_triton_words_it(server, version):
    want = "Request for unknown model: 'nope'" + (f" version {version}" if version else "") \
        + " is not found"
    x = np.zeros((1, 16), np.float32)
    calls = []
    for client, mod in ((http(server), hc), (gc.InferenceServerClient(server.grpc), gc)):
        inp = mod.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        calls += [lambda c=client: c.get_model_metadata("nope", version),
                  lambda c=client: c.get_model_config("nope", version),
                  lambda c=client: c.get_inference_statistics("nope", version),
                  lambda c=client, i=inp: c.infer("nope", [i], model_version=version)]
    for call in calls:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.message() == want
    assert http(server).is_model_ready("standin")          # and it serves on
