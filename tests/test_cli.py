"""The command line: fail fast with a clear message; the default model; --model URL."""
import functools
import http.server
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import MODELS, need_shared
from gpserve.workers.default_model import spiral_points

from gpserve.client import Client
from gpserve.testing import Server, free_port


def serve(*args, timeout=60, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "gpserve", "serve", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_bad_flags_fail_fast():
    r = serve("--model", "echo", "--max-batch", "0")
    assert r.returncode != 0 and "--max-batch must be at least 1" in r.stderr
    r = serve("--model", "echo", "--device", "tpu")
    assert r.returncode != 0 and "--device 'tpu'" in r.stderr
    r = serve("--model", "echo", "--listen", "nonsense")
    assert r.returncode != 0 and "is not host:port" in r.stderr
    r = serve("--model", "echo", "--restricted-api", "everything:k=v")
    assert r.returncode != 0 and "unknown API group 'everything'" in r.stderr
    r = serve("--no-such-flag")
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr


@pytest.mark.parametrize("name,value,says", [
    ("GP_FRONTS", "abc", "GP_FRONTS='abc': expected a whole number"),
    ("GP_MAX_DELAY_MS", "soon", "GP_MAX_DELAY_MS='soon': expected a number"),
    ("GP_BATCHING", "sometimes", "GP_BATCHING='sometimes': expected one of 'auto', 'off'"),
    ("GP_CACHE", "maybe", "GP_CACHE='maybe': expected one of 1/0"),
    ("GP_LOG_FORMAT", "xml", "GP_LOG_FORMAT='xml': expected one of 'text', 'json'"),
])
def test_bad_environment_variables_fail_fast(name, value, says):
    r = serve("--model", "echo", env={name: value}, timeout=30)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr


def test_client_against_a_server_that_is_not_up():
    from gpserve.client import ConnectionFailed, execute
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionFailed) as info:
        execute(url, np.zeros((1, 2), np.float32))
    assert str(info.value) == f"cannot connect to {url}: connection refused"
    assert info.value.http_status == 0


def test_missing_and_unloadable_models(tmp_path):
    r = serve("--model", str(tmp_path / "absent.onnx"))
    assert r.returncode != 0 and "no such file or directory" in r.stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    r = serve("--model", str(broken))
    assert r.returncode != 0 and "cannot load model" in r.stderr and "backend onnx" in r.stderr
    odd = tmp_path / "model.xyz"
    odd.write_bytes(b"?")
    r = serve("--model", str(odd))
    assert r.returncode != 0 and "cannot tell which backend" in r.stderr


def test_wrong_names_for_inputs_flag():
    r = serve("--model", str(need_shared(MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx")),
              "--inputs", "image")
    assert r.returncode != 0 and "--inputs names 'image'" in r.stderr


def test_port_in_use():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = serve("--model", "echo", "--listen", f"127.0.0.1:{port}")
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_default_model_is_built_once_and_classifies(tmp_path):
    env = {"GP_MODELS_DIR": str(tmp_path / "models")}
    points, labels = spiral_points(100, seed=42)
    with Server(env=env) as s, Client(s.url) as c:
        assert s.info()["name"] == "spirals"
        probs = c.execute(points)
    assert probs.shape == (300, 3)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() > 0.95
    built = tmp_path / "models" / "spirals.onnx"
    assert built.exists()
    mtime = built.stat().st_mtime_ns
    with Server(env=env):
        assert built.stat().st_mtime_ns == mtime       # reused, not rebuilt


@pytest.fixture
def http_models():
    """A plain HTTP server on loopback serving ../shared/models."""
    folder = need_shared(MODELS)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_model_from_url_downloaded_once(tmp_path, http_models):
    url = f"{http_models}/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    env = {"GP_MODELS_DIR": str(tmp_path)}
    x = np.load(MODELS / "fixtures" / "ocr_cls_input.npy")
    with Server("--model", url, env=env) as s, Client(s.url) as c:
        assert c.execute(x).argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
        assert "downloaded ch_ppocr_mobile_v2.0_cls_infer.onnx (585532 bytes" in s.output()
    files = list((tmp_path / "downloads").rglob("*.onnx"))
    assert len(files) == 1 and files[0].stat().st_size == 585532
    with Server("--model", url, env=env) as s:
        assert "gpserve: downloaded" not in s.output()
    r = serve("--model", f"{http_models}/missing.onnx", env=env)
    assert r.returncode != 0 and "download failed" in r.stderr and "404" in r.stderr


class _Truncating(http.server.BaseHTTPRequestHandler):
    """Serves ``body`` at any path; at /cut it announces all of it and sends half."""

    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.body[:len(self.body) // 2] if self.path == "/cut" else self.body)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_download_cut_short_or_with_the_wrong_digest_is_never_kept(tmp_path):
    import hashlib

    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])], "neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _Truncating.body = model.SerializeToString()
    digest = hashlib.sha256(_Truncating.body).hexdigest()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncating)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    env = {"GP_MODELS_DIR": str(tmp_path)}
    kept = lambda: [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
    try:
        for _ in range(2):                      # and again: nothing was kept the first time
            r = serve("--model", f"{base}/cut", env=env)
            assert r.returncode != 0 and "download cut short" in r.stderr, r.stderr
            assert f"{len(_Truncating.body) // 2} of the {len(_Truncating.body)} bytes" \
                in r.stderr
            assert kept() == []
        r = serve("--model", f"{base}/neg.onnx#sha256={'0' * 64}", env=env)
        assert r.returncode != 0 and f"SHA-256 is {digest}, not {'0' * 64}" in r.stderr
        r = serve("--model", f"{base}/neg.onnx", "--model-sha256", "0" * 64, env=env)
        assert r.returncode != 0 and "nothing kept" in r.stderr
        assert kept() == []
        with Server("--model", f"{base}/neg.onnx#sha256={digest}", env=env) as s, \
                Client(s.url) as c:
            assert c.execute(np.ones((1, 2), np.float32)).tolist() == [[-1, -1]]
            assert f"sha256 {digest}" in s.output()
        assert [p.name for p in kept()] == ["neg.onnx"]
    finally:
        httpd.shutdown()


def test_auto_device_falls_back_to_the_cpu_without_a_cuda_provider(caplog):
    """A GPU is visible but onnxruntime is the CPU-only package (as on our GPU hosts):
    --device auto serves on the CPU, saying so; --device cuda is an error."""
    from gpserve.workers.onnx import providers_for
    cpu_only = ["CPUExecutionProvider"]
    assert providers_for("cuda:0", cpu_only, chosen_by_user=False) == cpu_only
    assert "no CUDA provider: running on the CPU" in caplog.text
    with pytest.raises(ValueError, match="--device cuda:1: this onnxruntime has no CUDA"):
        providers_for("cuda:1", cpu_only, chosen_by_user=True)
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cuda:1", both, chosen_by_user=False)[0] == (
        "CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"})
    assert providers_for("cpu", both, chosen_by_user=True) == cpu_only


def test_every_backend_names_the_device_alike_and_tensorflow_falls_back_too(caplog):
    """cuda:N was parsed in three backends; TensorFlow lacked the CPU fallback the others
    have (a GPU visible, a tensorflow-cpu install: --device auto now serves on the CPU)."""
    from gpserve.workers.devices import device_index
    from gpserve.workers.tf import tf_device
    assert [device_index(d) for d in ("cuda", "cuda:0", "cuda:3")] == [0, 0, 3]
    assert tf_device("cuda:1", has_gpu=True, chosen_by_user=False) == "/GPU:1"
    assert tf_device("cuda", has_gpu=True, chosen_by_user=True) == "/GPU:0"
    assert tf_device("cpu", has_gpu=True, chosen_by_user=True) == "/CPU:0"
    assert tf_device("cuda:0", has_gpu=False, chosen_by_user=False) == "/CPU:0"
    assert "TensorFlow sees no GPU" in caplog.text
    with pytest.raises(ValueError, match="--device cuda:2: this TensorFlow sees no GPU"):
        tf_device("cuda:2", has_gpu=False, chosen_by_user=True)


def test_onnx_on_cuda_runs_each_batch_size_in_a_session_of_its_own(tmp_path):
    """ONNX Runtime's CUDA convolutions re-plan on every change of input shape, so a
    worker on CUDA gives each batch size it warms a session of its own and runs a batch
    in the session of its size (others in the first). On the CPU nothing changes. Real
    ONNX Runtime on the CPU; only the provider check is overridden."""
    from gpserve.workers.batch_check import made_up_rows
    from gpserve.workers.default_model import ensure
    from gpserve.workers.onnx import OnnxBackend
    backend = OnnxBackend(str(ensure(tmp_path / "default.onnx")), "cpu", 1, [], [])
    assert not backend.on_cuda
    backend.prepare_batch_size(4)
    assert backend.per_size == {}                 # the CPU: one session for every size
    backend.on_cuda = True
    for size in (1, 4, 4):
        backend.prepare_batch_size(size)
    assert sorted(backend.per_size) == [1, 4]
    used = []
    for session in [backend.session, *backend.per_size.values()]:
        session.run = (lambda run, s: lambda *a: used.append(s) or run(*a))(session.run, session)
    names = [s.name for s in backend.spec.outputs]
    for rows in (4, 3, 1):
        feed = made_up_rows(backend.spec, rows)
        assert backend.run(feed, names, "")[0].shape[0] == rows
    assert used == [backend.per_size[4], backend.session, backend.per_size[1]]


def test_onnx_without_room_for_another_session_shares_the_first(tmp_path, caplog):
    """A session per size that cannot be made (device memory, say) is not fatal: the
    sizes without one run in the first session, and the log says what that costs."""
    from gpserve.workers.default_model import ensure
    from gpserve.workers.onnx import OnnxBackend
    backend = OnnxBackend(str(ensure(tmp_path / "default.onnx")), "cpu", 1, [], [])
    backend.on_cuda = True
    backend.prepare_batch_size(1)

    def out_of_memory():
        raise RuntimeError("CUDA failure 2: out of memory")
    backend._new_session = out_of_memory
    backend.prepare_batch_size(8)
    backend.prepare_batch_size(16)
    assert sorted(backend.per_size) == [1] and backend.per_size_failed
    assert caplog.text.count("no session of its own for batch size 8") == 1
    assert "out of memory" in caplog.text and "batch size 16" not in caplog.text
