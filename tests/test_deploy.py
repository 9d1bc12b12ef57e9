"""Deployment: compose.yaml and the Kubernetes manifests are valid, compose's gpserve
services run as local processes with their own command and environment, nginx balances
two of them, /metrics counts what happened, and the logs say so."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, Redis

from gpserve.client import Client
from gpserve.errors import GraphPipeError
from gpserve.testing import Server, eventually, free_port, metric

COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "kubernetes"


def test_compose_file_follows_the_compose_specification():
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                        "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["gpserve"]["shm_size"] and "rows:/var/cache/gpserve" in \
        services["gpserve"]["volumes"]
    assert services["gpserve-gpu"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"] == ["gpu"]
    assert set(services["nginx"]["profiles"]) == {"lb"} and services["replica"]["deploy"][
        "replicas"] == 2
    assert services["replica"]["environment"]["GP_CACHE_SHARED"] == "redis://redis:6379/0"
    assert services["redis"]["profiles"] == ["lb"] and services["redis"]["build"] == {
        "context": "deploy/redis"}
    assert services["prometheus"]["profiles"] == ["monitoring"]


@pytest.mark.parametrize("manifest", sorted(p.name for p in K8S.glob("*.yaml")))
def test_kubernetes_manifests_are_valid(manifest):
    import kubernetes_validate
    for doc in yaml.safe_load_all((K8S / manifest).read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_drain_and_shm():
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/control/is_ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/control/is_alive"
    assert "preStop" in c["lifecycle"] and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"


def compose_service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def local_env(service: dict, models: Path, cache: Path, port: int,
              model_file: str | None = "model.onnx") -> dict:
    """The service's environment for a local process: ${VAR:-default} filled with the
    default, container paths mapped to local folders, loopback instead of 0.0.0.0, and
    GP_MODEL_FILE turned into GP_MODEL as the image's entrypoint does."""
    env = {}
    for key, value in service["environment"].items():
        if value is None:                   # taken from the caller's environment
            continue
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        env[key] = value.replace("/models", str(models)).replace("/var/cache/gpserve",
                                                                  str(cache))
    assert env["GP_LISTEN"].startswith("0.0.0.0:")
    assert "GP_MODEL_FILE" in service["environment"] and "GP_MODEL" not in env
    env["GP_LISTEN"] = f"127.0.0.1:{port}"
    if model_file:
        env["GP_MODEL"] = str(models / model_file)
    return env


def compose_process(name: str, models: Path, cache: Path,
                    hosts: dict[str, str] | None = None) -> Server:
    """A compose service's command and environment, run as a local process (``hosts``:
    a compose service's address in a variable, and the local one to use instead)."""
    service, port = compose_service(name), free_port()
    env = local_env(service, models, cache, port)
    for there, here in (hosts or {}).items():
        env = {k: v.replace(there, here) for k, v in env.items()}
    return Server(command=service["command"], env=env, port=port, ready_timeout=120)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """./models as compose mounts it, with model.onnx (the default model, built here)."""
    from gpserve.workers.default_model import ensure
    folder = tmp_path_factory.mktemp("models")
    ensure(folder / "model.onnx")
    return folder


def spiral_request():
    from gpserve.workers.default_model import spiral_points
    return spiral_points(20, seed=3)


def test_compose_gpserve_service_runs_locally(models, tmp_path):
    points, labels = spiral_request()
    with compose_process("gpserve", models, tmp_path) as s, Client(s.url) as c:
        probs = c.execute(points)
        assert (probs.argmax(1) == labels).mean() > 0.9
        info = s.info()
        assert info["cache"]["enabled"] and info["batching"]["max_batch"] == 32
        lines = [json.loads(t) for t in s.output().splitlines() if t.startswith("{")]
        summary = next(e for e in lines if e["message"].startswith("serving"))
        assert summary["process"] == "supervisor" and summary["cache"].startswith(str(tmp_path))


def test_compose_gpu_service_configuration_is_accepted(models, tmp_path):
    """Without a GPU here, the gpu service's environment must at least parse and load."""
    env = local_env(compose_service("gpserve-gpu"), models, tmp_path, free_port())
    assert env["GP_DEVICE"] == "cuda"
    r = subprocess.run([sys.executable, "-c", "from gpserve.flags import add_serve_arguments, "
                        "from_args; import argparse; p = argparse.ArgumentParser(); "
                        "add_serve_arguments(p); c = from_args(p.parse_args([])); "
                        "print(c.device, c.cache, c.model)"],
                       env={**os.environ, **env}, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["cuda", "True", str(models / "model.onnx")]


def nginx_binary() -> str | None:
    """Debian's nginx; installed here when missing and we may (CI runs as root)."""
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && apt-get install -y -qq nginx-light",
                       shell=True, capture_output=True, timeout=600)
        found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    return found or None


def test_load_balanced_profile_with_nginx(models, tmp_path):
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed and cannot be installed here (needs root and apt)")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    redis = Redis()                             # the compose service's, as a local process
    hosts = {"redis:6379": f"127.0.0.1:{redis.port}"}
    a = compose_process("replica", models, tmp_path / "a", hosts)
    b = compose_process("replica", models, tmp_path / "b", hosts)
    port = free_port()
    conf = (ROOT / "deploy" / "nginx" / "gpserve.conf").read_text()
    conf = re.sub(r"server replica:9000;", f"server 127.0.0.1:{a.port};\n    "
                  f"server 127.0.0.1:{b.port};", conf)
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "gpserve.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        f"worker_processes 1;\nerror_log {tmp_path}/error.log;\npid {tmp_path}/nginx.pid;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n"
        f"  client_body_temp_path {tmp_path};\n  include {tmp_path}/conf.d/*.conf;\n}}\n")
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "control/is_ready", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        points, labels = spiral_request()
        from gpserve.workers.default_model import spiral_points

        from gpserve import protocol as P
        body = bytes(P.encode_request(P.InferRequest([points])))
        upstreams = set()
        for _ in range(20):
            req = urllib.request.Request(url, data=body, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                upstreams.add(r.headers["X-Upstream"])
                probs = P.decode_response(r.read()).outputs[0]
            assert (probs.argmax(1) == labels).mean() > 0.9
        assert upstreams == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
        # the shared tier: rows one replica computed are hits on the other
        fresh = bytes(P.encode_request(P.InferRequest([spiral_points(5, seed=11)[0]])))
        held = redis.client.dbsize()
        urllib.request.urlopen(urllib.request.Request(a.url, data=fresh), timeout=10).read()
        eventually(lambda: redis.client.dbsize() > held, what="a's rows in Redis")
        urllib.request.urlopen(urllib.request.Request(b.url, data=fresh), timeout=10).read()
        assert b.info()["cache"]["shared_hits"] == 15
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(10)
        a.stop()
        b.stop()
        redis.__exit__()


def test_metrics_count_known_traffic(tmp_path):
    with Server("--model", "echo", "--cache", "--cache-dir", str(tmp_path),
                "--placement", "workers") as s, \
            Client(s.url) as c:
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        c.execute(x)                 # 4 rows computed, then 8 answered by the cache
        eventually(lambda: s.info()["cache"]["writes"] >= 4, 30, "the cache write")
        c.execute(x)
        c.execute(x)
        with pytest.raises(GraphPipeError):
            c.execute_multi([x], ["a", "b"], None)
        c.metadata()

        def scrape() -> str:
            return urllib.request.urlopen(s.url + "/metrics").read().decode()
        # per-request metrics are tallied in each process and written within FLUSH_S
        eventually(lambda: metric(scrape(), "gpserve_request_seconds_count") == 5 and
                   metric(scrape(), "gpserve_queue_wait_seconds_count") == 1 and
                   metric(scrape(), "gpserve_model_seconds_count") == 1, 10,
                   "the tallied metrics written")
        text = scrape()
        assert metric(text, "gpserve_requests_total", status="200", kind="infer") == 3
        assert metric(text, "gpserve_requests_total", status="400", kind="error") == 1
        assert metric(text, "gpserve_requests_total", status="200", kind="metadata") == 1
        assert metric(text, "gpserve_rows_total", source="model") == 4
        assert metric(text, "gpserve_rows_total", source="cache") == 8
        assert metric(text, "gpserve_request_seconds_count") == 5
        assert metric(text, "gpserve_batch_rows_count") == 1
        assert metric(text, "gpserve_model_seconds_count") == 1
        assert metric(text, "gpserve_queue_wait_seconds_count") == 1
        assert metric(text, "gpserve_response_build_seconds_count") == 3
        assert metric(text, "gpserve_model_load_seconds") > 0
        assert metric(text, "gpserve_cache_bytes") > 0
        worker = s.info()["processes"]["pids"]["workers"][0]
        os.kill(worker, signal.SIGKILL)
        eventually(lambda: s.stats()["worker_restarts"] >= 1, 30, "the worker's restart")
        text = scrape()
        assert metric(text, "gpserve_process_restarts_total", role="worker") == 1
        assert metric(text, "gpserve_requests_total", status="200", kind="infer") == 3


def test_json_logs_with_access_lines():
    """One access line per request, whichever door: GraphPipe, and gRPC (was not logged)."""
    import tritonclient.grpc as gc
    port = free_port()
    with Server("--model", "echo", "--log-format", "json", "--access-log", "info", "-v",
                "--grpc-listen", f"127.0.0.1:{port}") as s, Client(s.url) as c:
        c.execute(np.ones((2, 2), np.float32))
        inp = gc.InferInput("x", [2, 2], "FP32")
        inp.set_data_from_numpy(np.ones((2, 2), np.float32))
        gc.InferenceServerClient(f"127.0.0.1:{port}").infer("echo", [inp])
        eventually(lambda: s.output().count('"gpserve.access"') >= 2, 30, "access lines")
        lines = [json.loads(t) for t in s.output().splitlines() if t.startswith("{")]
    access = [e for e in lines if e["logger"] == "gpserve.access"]
    assert len(access) == 2 and access[0]["status"] == 200 and access[0]["kind"] == "infer"
    assert access[0]["process"].startswith("front") and access[0]["bytes_out"] > 0
    grpc_line = access[1]
    assert grpc_line["method"] == "gRPC" and grpc_line["kind"] == "grpc_infer"
    assert grpc_line["path"].endswith("GRPCInferenceService/ModelInfer")
    assert grpc_line["client"] == "127.0.0.1" and grpc_line["bytes_in"] > 16
    summary = next(e for e in lines if e["message"].startswith("serving echo"))
    assert summary["fronts"] >= 1 and summary["listen"] == f"{s.url}, grpc://127.0.0.1:{port}"


KSERVE = K8S / "kserve"


def kserve_problems(kserve_python, text: str) -> list[str]:
    """What KServe's schema (its SDK's generated models) finds wrong in ``text``."""
    r = subprocess.run([str(kserve_python), str(ROOT / "tests" / "kserve_schema.py")],
                       input=text, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    version, *problems = r.stdout.splitlines()
    assert version == "kserve 0.21.0"
    return [p for p in problems if p]


def test_kserve_runtime_and_inference_service_follow_kserves_schema(kserve_python):
    for manifest in ("cluster-serving-runtime.yaml", "inference-service.yaml"):
        assert kserve_problems(kserve_python, (KSERVE / manifest).read_text()) == [], manifest
    bad = (KSERVE / "inference-service.yaml").read_text().replace(
        "protocolVersion: v2", "protocolVersion: v2\n      replicas: 3")
    assert kserve_problems(kserve_python, bad) == [
        "InferenceService.spec.predictor.model.replicas: not a field of V1beta1ModelSpec"]


def test_kserve_runtime_serves_a_repository_as_kserve_mounts_it(default_model, tmp_path):
    """The runtime's own arguments: what KServe needs of them, and a server started with
    them on a repository laid out as the storage initializer leaves /mnt/models."""
    import argparse

    import tritonclient.http as hc

    from gpserve.flags import add_serve_arguments, from_args
    runtime = yaml.safe_load((KSERVE / "cluster-serving-runtime.yaml").read_text())["spec"]
    isvc = yaml.safe_load((KSERVE / "inference-service.yaml").read_text())["spec"]
    [container] = runtime["containers"]
    assert container["name"] == "kserve-container"
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    assert {f["name"] for f in runtime["supportedModelFormats"]} == {"onnx", "tensorflow",
                                                                      "pytorch"}
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert container["securityContext"]["runAsNonRoot"] and \
        container["securityContext"]["runAsUser"] == int(uid)
    assert runtime["annotations"]["prometheus.kserve.io/port"] == "8080"
    shm = next(v for v in runtime["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert isvc["predictor"]["model"]["runtime"] == "gpserve"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    cfg = from_args(parser.parse_args(container["args"][1:]))
    assert (cfg.model_repository, cfg.port, cfg.grpc_listen) == ("/mnt/models", 8080,
                                                                 "0.0.0.0:9000")
    (tmp_path / "spirals" / "1").mkdir(parents=True)
    shutil.copyfile(default_model, tmp_path / "spirals" / "1" / "model.onnx")
    args = [a for a in container["args"][1:] if "listen" not in a]
    args = [f"--model-repository={tmp_path}" if a.startswith("--model-repository") else a
            for a in args]
    with Server(*args, "--fronts", "1") as s:
        client = hc.InferenceServerClient(s.url.removeprefix("http://"))
        assert client.is_model_ready("spirals")
        inp = hc.InferInput("point", [1, 2], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 2), np.float32))
        assert client.infer("spirals", [inp]).as_numpy("probabilities").shape == (1, 3)
