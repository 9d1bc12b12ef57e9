"""Shared fixtures: the isolated graphpipe 1.0.4 client, model paths, a running server."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODELS = SHARED / "models"
GRAPHPIPE_DIR = Path(os.environ.get(
    "GPSERVE_TEST_CACHE", Path.home() / ".cache" / "gpserve-tests")) / "graphpipe-1.0.4"


# flatbuffers 1.12 (what graphpipe 1.0.4 needs) imports `imp`, which Python 3.12 removed,
# only for `imp.find_module("numpy")`. This stand-in, in the isolated folder alone, keeps
# the unmodified client running on every Python gpserve supports.
_IMP_SHIM = '''"""Stand-in for the `imp` module (removed in Python 3.12) for flatbuffers 1.12."""
import importlib.util


def find_module(name, path=None):
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"No module named {name!r}")
'''


def _install_graphpipe() -> Path:
    """graphpipe 1.0.4 + flatbuffers 1.12 in a folder of their own (not the project's env)."""
    marker = GRAPHPIPE_DIR / ".installed"
    if not marker.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade",
             "--target", str(GRAPHPIPE_DIR), "graphpipe==1.0.4", "flatbuffers==1.12"],
            check=True)
        marker.write_text("ok\n")
    if sys.version_info >= (3, 12) and not (GRAPHPIPE_DIR / "imp.py").exists():
        (GRAPHPIPE_DIR / "imp.py").write_text(_IMP_SHIM)
    return GRAPHPIPE_DIR


class GraphPipePeer:
    """Calls into graphpipe 1.0.4 in a subprocess; see tests/graphpipe_peer.py."""

    def __init__(self, path: Path):
        self.env = dict(os.environ, PYTHONPATH=str(path))

    def __call__(self, *calls: tuple[str, tuple]) -> list:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "graphpipe_peer.py")],
            input=pickle.dumps(list(calls)), capture_output=True, env=self.env, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"graphpipe peer failed:\n{proc.stderr.decode()}")
        return pickle.loads(proc.stdout)

    def one(self, op: str, *args):
        return self((op, args))[0]


@pytest.fixture(scope="session")
def graphpipe() -> GraphPipePeer:
    return GraphPipePeer(_install_graphpipe())


KSERVE = "kserve==0.21.0"


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    """A Python with the kserve SDK (its v2 REST client), in a venv of its own: the SDK
    pulls FastAPI, pandas and its own pins, which stay out of the project's env."""
    venv = GRAPHPIPE_DIR.parent / KSERVE.replace("==", "-")
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", KSERVE], check=True)
        marker.write_text("ok\n")
    return python


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need ../shared beside the checkout (CI has it)")
    return path


@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory) -> Path:
    """The MiniLM model, gunzipped once per session (the server also reads .gz directly)."""
    import gzip
    src = need_shared(MODELS / "all-MiniLM-L6-v2_int8.onnx.gz")
    dst = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2_int8.onnx"
    dst.write_bytes(gzip.decompress(src.read_bytes()))
    return dst


def ort_session(path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> Path:
    """The project's own default model, built (no ../shared needed)."""
    from gpserve.workers.default_model import ensure
    return ensure(tmp_path_factory.mktemp("models") / "spirals.onnx")


def scale_model(path: Path, factor: float, width: int = 4) -> Path:
    """y = x * factor, z = x + factor: two outputs, float32 [N,width]."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("Add", ["x", "k"], ["z"])],
        "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", width])],
        initializer=[helper.make_tensor("k", TensorProto.FLOAT, [], [factor])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def redis_binary() -> str | None:
    """Debian's redis-server; installed here when missing and we may (CI runs as root)."""
    found = shutil.which("redis-server")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get "
                       "install -y -qq redis-server", shell=True, capture_output=True,
                       timeout=600)
        found = shutil.which("redis-server")
    return found


def tls_files(folder: Path) -> Path:
    """A test CA and a server certificate for 127.0.0.1 signed by it (openssl):
    ``ca.pem``, ``server.pem``, ``server.key`` in ``folder``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=gpserve-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return folder


class Redis:
    """A redis-server of this test, on loopback, its data in memory only."""

    def __init__(self, port: int | None = None, *args: str, tls: Path | None = None):
        """``tls``: a folder of TLS files (``tls_files``): it serves TLS only."""
        binary = redis_binary()
        if binary is None:
            pytest.skip("redis-server is not installed and cannot be (needs root and apt)")
        from gpserve.testing import eventually, free_port
        self.port, self.tls = port or free_port(), tls
        listen = ["--port", str(self.port)] if tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
            "--tls-cert-file", str(tls / "server.pem"), "--tls-key-file",
            str(tls / "server.key"), "--tls-ca-cert-file", str(tls / "ca.pem")]
        self.proc = subprocess.Popen(
            [binary, *listen, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--enable-debug-command", "local", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
        self.client = redis.Redis(port=self.port, password=password) if tls is None else \
            redis.Redis.from_url(self.url)
        eventually(self._pings, 30, "redis-server up")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    @property
    def url(self) -> str:
        if self.tls is not None:          # the certificate verified against the test's CA
            return (f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                    f"&ssl_ca_certs={self.tls / 'ca.pem'}")
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> "Redis":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
