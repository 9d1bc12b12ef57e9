"""Several models, and several versions of one, served by one server from a repository
folder (``--model-repository``): each reached by name over GraphPipe (by URL, with the
unmodified graphpipe 1.0.4) and over v2 (REST and gRPC, tritonclient), each with its
own workers, batching, counters and row cache, and no model's rows answered for
another."""
import shutil

import numpy as np
import pytest
import tritonclient.grpc as gc
import tritonclient.http as hc
from conftest import MODELS, need_shared, ort_session, scale_model

from gpserve import protocol as P
from gpserve.client import Client
from gpserve.testing import Server, eventually, free_port, metric

FIXTURES = MODELS / "fixtures"


def v2_infer(client, model, x, version=""):
    inp = hc.InferInput("point", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=version)
    return result.as_numpy(result.get_response()["outputs"][0]["name"])


def cache_hits(client, model, version=""):
    [stats] = client.get_inference_statistics(model, version)["model_stats"]
    return int(stats["inference_stats"]["cache_hit"]["count"])


@pytest.fixture
def spirals_repository(tmp_path, default_model):
    """spirals versions 1 and 2 (Triton's layout) and a flat file of another name."""
    for version in (1, 2):
        (tmp_path / "spirals" / str(version)).mkdir(parents=True)
        shutil.copyfile(default_model, tmp_path / "spirals" / str(version) / "model.onnx")
    shutil.copyfile(default_model, tmp_path / "twin.onnx")
    return tmp_path


def test_models_and_versions_by_name_over_every_protocol(spirals_repository, graphpipe,
                                                          tmp_path_factory):
    x = np.array([[0.2, 0.3], [-0.5, 0.9], [0.1, -0.7]], np.float32)
    grpc_port = free_port()
    with Server("--model-repository", str(spirals_repository), "--version-policy", "all",
                "--fronts", "1", "--cache", "--cache-dir",
                str(tmp_path_factory.mktemp("rows")),
                "--grpc-listen", f"127.0.0.1:{grpc_port}") as s:
        info = s.info()
        assert [(m["name"], m["version"], m["state"]) for m in info["models"]] == [
            ("spirals", "2", "READY"), ("spirals", "1", "READY"), ("twin", "1", "READY")]
        assert info["default_model"] is None
        assert all(m["versions"] == (["2", "1"] if m["name"] == "spirals" else ["1"])
                   for m in info["models"])
        with Client(s.url + "/models/spirals") as c:
            want = c.execute(x)
        # GraphPipe by URL: every model and version, with graphpipe 1.0.4 unchanged
        for path in ("/models/spirals", "/models/spirals/versions/1",
                     "/models/spirals/versions/2", "/models/twin"):
            np.testing.assert_array_equal(graphpipe.one("execute", s.url + path, x), want)
        # POST / with several models and no --default-model: a GraphPipe error naming them
        got = graphpipe.one("execute", s.url + "/", x)
        err = P.decode_response(got["body"])
        assert got["status"] == 404 and "2 models (spirals, twin)" in err.errors[0].message
        # v2 over REST: the newest version without one, any served version by number
        rest = hc.InferenceServerClient(s.url.removeprefix("http://"))
        for version in ("", "1", "2"):
            np.testing.assert_array_equal(v2_infer(rest, "spirals", x, version), want)
        assert rest.get_model_metadata("spirals")["versions"] == ["1", "2"]
        assert rest.is_model_ready("spirals", "1") and not rest.is_model_ready("spirals", "3")
        with pytest.raises(Exception, match="'spirals' version 3 is not found"):
            v2_infer(rest, "spirals", x, "3")
        # and over gRPC
        grpc = gc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert grpc.get_model_metadata("twin").name == "twin"
        inp = gc.InferInput("point", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = grpc.infer("spirals", [inp], model_version="1")
        assert result.get_response().model_version == "1"
        np.testing.assert_array_equal(result.as_numpy(result.get_response().outputs[0].name),
                                      want)
        # the row cache: each version answers only the rows it computed itself. Every
        # call above computed x once per model version, so all were hits but the first.
        y = np.array([[0.9, 0.9]], np.float32)
        v2_infer(rest, "spirals", y, "1")
        hits_before = {v: cache_hits(rest, "spirals", v) for v in ("1", "2")}
        twin_before = cache_hits(rest, "twin")
        v2_infer(rest, "spirals", y, "1")                     # a hit on version 1 ...
        v2_infer(rest, "spirals", y, "2")                     # ... a miss on version 2
        v2_infer(rest, "twin", y)                             # ... and on the other model
        assert cache_hits(rest, "spirals", "1") == hits_before["1"] + 1
        assert cache_hits(rest, "spirals", "2") == hits_before["2"]
        assert cache_hits(rest, "twin") == twin_before
        # metrics by model and version: twin computed x's 3 rows and y's once, hit none
        text = s.metrics_text()
        assert metric(text, "gpserve_rows_total", source="model", model="twin",
                      version="1") == 4
        assert metric(text, "gpserve_rows_total", source="cache", model="twin") == 0
        assert metric(text, "gpserve_rows_total", source="cache", model="spirals",
                      version="1") >= 7
        # statistics: one entry per model version served
        every = rest.get_inference_statistics()["model_stats"]
        assert sorted((m["name"], m["version"]) for m in every) == [
            ("spirals", "1"), ("spirals", "2"), ("twin", "1")]


def test_the_default_model_and_the_flags_that_name_models(spirals_repository):
    import subprocess
    import sys
    x = np.array([[0.2, 0.3]], np.float32)
    with Server("--model-repository", str(spirals_repository), "--default-model", "twin",
                "--fronts", "1") as s:
        info = s.info()
        assert info["name"] == "twin" and info["default_model"] == "twin"
        assert [(m["name"], m["version"]) for m in info["models"]] == [
            ("twin", "1"), ("spirals", "2")]                 # latest only, by default
        with Client(s.url) as c, Client(s.url + "/models/twin") as twin:
            np.testing.assert_array_equal(c.execute(x), twin.execute(x))
            assert c.metadata().name == "twin"
    for args, words in (
            (["--default-model", "resnet"], "--default-model 'resnet' is not in"),
            (["--version-policy", "specific:7"], "no version of any model matches"),
            (["--version-policy", "newest"], "--version-policy: version policy 'newest'"),
            (["--model", "echo"], "drop --model and --model-name")):
        r = subprocess.run([sys.executable, "-m", "gpserve", "serve", "--listen",
                            "127.0.0.1:1", "--model-repository", str(spirals_repository),
                            *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and words in r.stderr, r.stderr


def test_ocr_minilm_and_the_default_model_on_one_server(tmp_path, default_model, graphpipe,
                                                         minilm_path):
    """The issue's three models at once: the OCR classifier (Triton's layout, in the
    fronts), MiniLM (a flat .onnx.gz, in a worker process of its own) and the project's
    default model, each answering as it does alone."""
    cls = need_shared(MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    (tmp_path / "ocr" / "1").mkdir(parents=True)
    (tmp_path / "ocr" / "1" / "model.onnx").symlink_to(cls)
    (tmp_path / "minilm.onnx.gz").symlink_to(MODELS / "all-MiniLM-L6-v2_int8.onnx.gz")
    (tmp_path / "spirals.onnx").symlink_to(default_model)
    # where each runs, set (auto decides by a timing, which a loaded machine moves)
    (tmp_path / "ocr" / "gpserve.toml").write_text('placement = "fronts"\n')
    (tmp_path / "minilm.toml").write_text('placement = "workers"\n')
    (tmp_path / "spirals.toml").write_text('placement = "fronts"\n')
    images = np.load(FIXTURES / "ocr_cls_input.npy")
    ref = np.load(FIXTURES / "minilm_reference.npz")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    feed = [ref[n] for n in names]
    emb = ort_session(minilm_path).run(None, dict(zip(names, feed)))[1]
    with Server("--model-repository", str(tmp_path), "--default-model", "spirals",
                "--fronts", "2") as s:
        placements = {m["name"]: (m["placement"], m["state"]) for m in s.info()["models"]}
        assert placements == {"spirals": ("fronts", "READY"), "ocr": ("fronts", "READY"),
                              "minilm": ("workers", "READY")}
        probs = graphpipe.one("execute", s.url + "/models/ocr", images)
        assert list(probs.argmax(1)) == [0, 0, 0, 1, 1, 1]
        got = graphpipe.one("execute_multi", s.url + "/models/minilm", feed, names,
                            ["sentence_embedding"], None)
        np.testing.assert_allclose(got[0], emb, atol=1e-5)
        rest = hc.InferenceServerClient(s.url.removeprefix("http://"))
        inp = hc.InferInput("x", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        result = rest.infer("ocr", [inp])
        np.testing.assert_allclose(result.as_numpy(result.get_response()["outputs"][0][
            "name"]), probs, atol=1e-6)
        with Client(s.url) as c:
            assert c.metadata().name == "spirals"
            assert c.execute(np.zeros((1, 2), np.float32)).shape == (1, 3)
        # each model counted its own rows: batching and statistics are per model
        stats = {m["name"]: m["inference_stats"]["success"]["count"]
                 for m in rest.get_inference_statistics()["model_stats"]}
        assert stats == {"spirals": 1, "ocr": 2, "minilm": 1}


class Load:
    """Clients sending GraphPipe requests to a model by URL without pause, in threads,
    keeping every answer's factor (y / x) and every failure."""

    def __init__(self, url: str, clients: int = 4):
        import threading
        self.url, self.stop = url, threading.Event()
        self.factors: list[float] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(clients)]

    def _run(self) -> None:
        x = np.ones((2, 4), np.float32)
        with Client(self.url) as c:
            while not self.stop.is_set():
                try:
                    y, _ = c.execute_multi([x], ["x"], ["y", "z"])
                    self.factors.append(float(y[0, 0]))
                except Exception as e:          # any failure counts: none is allowed
                    self.failures.append(repr(e))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def drop_version(repo, name: str, version: int, factor: float | None) -> None:
    """Put a version in the repository as an operator should: written beside it under
    a hidden name, then renamed in (a half-written file is never seen). ``factor``
    None: a file that is not a model."""
    staged = repo / f".{name}-{version}"
    staged.mkdir()
    if factor is None:
        (staged / "model.onnx").write_bytes(b"not a model")
    else:
        scale_model(staged / "model.onnx", factor)
    staged.rename(repo / name / str(version))


@pytest.mark.parametrize("placement", ["fronts", "workers"])
def test_a_new_version_is_swapped_in_under_load_without_a_failed_request(tmp_path,
                                                                        placement):
    (tmp_path / "scale" / "1").mkdir(parents=True)
    scale_model(tmp_path / "scale" / "1" / "model.onnx", 1.0)
    with Server("--model-repository", str(tmp_path), "--model-control", "poll",
                "--repository-poll-s", "0.2", "--fronts", "2", "--workers", "1",
                "--placement", placement) as s:
        processes = len(s.children())
        with Load(s.url + "/models/scale") as load:
            eventually(lambda: len(load.factors) > 50, what="the load running")
            drop_version(tmp_path, "scale", 2, 2.0)
            eventually(lambda: [m["version"] for m in s.info()["models"]] == ["2"],
                       what="version 2 alone served")
            served = len(load.factors)
            eventually(lambda: len(load.factors) > served + 50, what="more answers")
            # a version that cannot be loaded: said why, and version 2 serves on
            drop_version(tmp_path, "scale", 3, None)
            eventually(lambda: "scale/3/model.onnx" in s.output(), what="the failed load")
            served = len(load.factors)
            eventually(lambda: len(load.factors) > served + 50, what="more answers")
        assert load.failures == []
        assert set(load.factors) == {1.0, 2.0}
        switched = load.factors.index(2.0)
        assert load.factors[-50:] == [2.0] * 50 and switched > 0
        assert [m["version"] for m in s.info()["models"]] == ["2"]
        assert "cannot load model" in s.output()
        eventually(lambda: len(s.children()) == processes,
                   what="the old version's workers gone")


def test_the_repository_api_loads_and_unloads_under_load(tmp_path):
    """--model-control explicit: tritonclient's load/unload/index (REST and gRPC), a
    new version loaded by the API while clients run on the old one (none fails), and
    what the API refuses."""
    for name, factor in (("a", 2.0), ("b", 3.0)):
        (tmp_path / name / "1").mkdir(parents=True)
        scale_model(tmp_path / name / "1" / "model.onnx", factor)
    grpc_port = free_port()
    with Server("--model-repository", str(tmp_path), "--model-control", "explicit",
                "--load-models", "a", "--fronts", "2",
                "--grpc-listen", f"127.0.0.1:{grpc_port}") as s:
        rest = hc.InferenceServerClient(s.url.removeprefix("http://"))
        grpc = gc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert rest.get_model_repository_index() == [
            {"name": "a", "version": "1", "state": "READY", "reason": ""},
            {"name": "b", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert "model_repository" in rest.get_server_metadata()["extensions"]
        x = np.ones((1, 4), np.float32)

        def factor(model):
            inp = hc.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            result = rest.infer(model, [inp], outputs=[hc.InferRequestedOutput("y")])
            return float(result.as_numpy("y")[0, 0])
        with pytest.raises(Exception, match="Request for unknown model: 'b'"):
            factor("b")
        rest.load_model("b")                               # REST
        assert factor("b") == 3.0 and rest.is_model_ready("b")
        # a new version of a, loaded by the API while clients run on version 1
        with Load(s.url + "/models/a") as load:
            eventually(lambda: len(load.factors) > 50, what="the load running")
            drop_version(tmp_path, "a", 2, 5.0)
            grpc.load_model("a")                           # gRPC; returns once swapped
            assert factor("a") == 5.0
            served = len(load.factors)
            eventually(lambda: len(load.factors) > served + 50, what="more answers")
        assert load.failures == [] and set(load.factors) == {2.0, 5.0}
        assert load.factors[-50:] == [5.0] * 50
        grpc.unload_model("b")
        with pytest.raises(Exception, match="unknown model: 'b'"):
            factor("b")
        index = {(m.name, m.version, m.state) for m in grpc.get_model_repository_index().models}
        assert index == {("a", "2", "READY"), ("b", "", "UNAVAILABLE")}
        # refused: a model not in the repository, a version that cannot load, files sent
        with pytest.raises(Exception, match="no model zzz in"):
            rest.load_model("zzz")
        drop_version(tmp_path, "a", 3, None)
        with pytest.raises(Exception, match="load of 'a' failed: .*cannot load model"):
            rest.load_model("a")
        assert factor("a") == 5.0                           # version 2 serves on
        with pytest.raises(Exception, match="load parameter 'file:1/model.onnx' refused"):
            rest.load_model("b", files={"file:1/model.onnx": b"\x08"})
    shutil.rmtree(tmp_path / "a" / "3")       # at start, a version that fails stops it
    with Server("--model-repository", str(tmp_path), "--fronts", "1") as s:
        rest = hc.InferenceServerClient(s.url.removeprefix("http://"))
        with pytest.raises(Exception, match="only with --model-control explicit"):
            rest.unload_model("a")


def test_the_repository_api_is_restricted(tmp_path):
    scale_model(tmp_path / "a.onnx", 2.0)
    with Server("--model-repository", str(tmp_path), "--model-control", "explicit",
                "--restricted-api", "model-repository:admin-key=s3cret",
                "--fronts", "1") as s:
        rest = hc.InferenceServerClient(s.url.removeprefix("http://"))
        with pytest.raises(Exception, match="calls need the header 'admin-key'"):
            rest.load_model("a")
        assert rest.get_model_repository_index(headers={"admin-key": "s3cret"}) == [
            {"name": "a", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
        rest.load_model("a", headers={"admin-key": "s3cret"})
        assert rest.is_model_ready("a")


def test_each_model_takes_its_own_settings_over_the_flags(tmp_path):
    """gpserve.toml (Triton's layout), <name>.toml (a flat file) and Triton's
    config.pbtxt set a model's batching, workers and placement; the flags stay the
    defaults of everything else."""
    for name in ("toml", "triton", "plain"):
        (tmp_path / name / "1").mkdir(parents=True)
        scale_model(tmp_path / name / "1" / "model.onnx", 1.0)
    (tmp_path / "toml" / "gpserve.toml").write_text(
        'max-batch = 4\nmax-delay-ms = 0.5\nplacement = "workers"\nworkers = 2\n')
    (tmp_path / "triton" / "config.pbtxt").write_text(
        'name: "triton"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'dynamic_batching { max_queue_delay_microseconds: 3000 preferred_batch_size: [2, 4] }\n'
        'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
        'model_warmup [ { name: "w" batch_size: 1 } ]\n')       # read and ignored
    scale_model(tmp_path / "flat.onnx", 1.0)
    (tmp_path / "flat.toml").write_text("batching = 'off'\n")
    with Server("--model-repository", str(tmp_path), "--fronts", "1", "--max-batch", "16",
                "--max-delay-ms", "1", "--placement", "fronts") as s:
        got = {m["name"]: (m["batching"]["max_batch"], m["batching"]["max_delay_ms"],
                           m["batching"]["enabled"], m["placement"], m["workers"])
               for m in s.info()["models"]}
        assert got == {"toml": (4, 0.5, True, "workers", 2),
                       "triton": (8, 3.0, True, "fronts", 1),
                       "plain": (16, 1.0, True, "fronts", 1),
                       "flat": (16, 1.0, False, "fronts", 1)}, got
        triton = hc.InferenceServerClient(s.url.removeprefix("http://")).get_model_config(
            "triton")
        assert triton["max_batch_size"] == 8


@pytest.mark.parametrize("name, text, words", [
    ("gpserve.toml", "max-batch = 0\n", "--max-batch must be at least 1"),
    ("gpserve.toml", "listen = '0.0.0.0:1'\n", "'listen' is not a per-model setting"),
    ("gpserve.toml", "placement = 'gpu'\n", "argument --placement: invalid choice: 'gpu'"),
    ("config.pbtxt", "sequence_batching { }\n", "sequence batching (stateful models)"),
    ("config.pbtxt", "max_batch_size: banana\n", "not a Triton model configuration"),
])
def test_settings_that_cannot_be_honoured_stop_the_start_saying_where(tmp_path, name, text,
                                                                       words):
    import subprocess
    import sys
    (tmp_path / "m" / "1").mkdir(parents=True)
    scale_model(tmp_path / "m" / "1" / "model.onnx", 1.0)
    (tmp_path / "m" / name).write_text(text)
    r = subprocess.run([sys.executable, "-m", "gpserve", "serve", "--listen", "127.0.0.1:1",
                        "--model-repository", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and words in r.stderr and str(tmp_path / "m" / name) in \
        r.stderr, r.stderr
