"""TensorFlow and PyTorch backends, and choosing a backend, with real models in every format."""
import asyncio
import subprocess
import sys

import numpy as np
import pytest
from conftest import MODELS, need_shared

from gpserve.client import AsyncClient, Client
from gpserve.testing import Server, eventually

tf = pytest.importorskip("tensorflow", reason="the TensorFlow backend needs gpserve[tensorflow]")
torch = pytest.importorskip("torch", reason="the PyTorch backend needs gpserve[torch]")

CLS = {
    "onnx": (MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx", [], False),
    "savedmodel": (MODELS / "ch_ppocr_mobile_v2.0_cls_savedmodel", [], True),
    "frozen": (MODELS / "ch_ppocr_mobile_v2.0_cls_frozen.pb", [], True),
    "torchscript": (MODELS / "ch_ppocr_mobile_v2.0_cls_torchscript.pt",
                    ["--shapes", "x=-1,3,48,192"], False),
}
VAD_TS = MODELS / "silero_vad_16k_torchscript.pt"


def in_process(fmt: str, x_nchw: np.ndarray) -> np.ndarray:
    """The same format run in this process, the reference for the server's answers."""
    path = str(CLS[fmt][0])
    if fmt == "onnx":
        from conftest import ort_session
        return ort_session(path).run(None, {"x": x_nchw})[0]
    nhwc = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    if fmt == "savedmodel":
        fn = tf.saved_model.load(path).signatures["serving_default"]
        return fn(x=tf.constant(nhwc))["output_0"].numpy()
    if fmt == "frozen":
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(open(path, "rb").read())
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as sess:
            return sess.run("probs:0", {"x:0": nhwc})
    module = torch.jit.load(path)
    with torch.inference_mode():
        return module(torch.from_numpy(x_nchw)).numpy()


def layout(fmt: str, x_nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)) if CLS[fmt][2] else x_nchw


@pytest.fixture(scope="module", params=list(CLS))
def cls_server(request):
    path, flags, _ = CLS[request.param]
    with Server("--model", str(need_shared(path)), *flags) as s:
        yield request.param, s


def test_classifier_labels_and_values_in_every_format(cls_server):
    fmt, server = cls_server
    fixture = np.load(MODELS / "fixtures" / "ocr_cls_input.npy")
    rng = np.random.default_rng(11)
    with Client(server.url) as c:
        assert c.execute(layout(fmt, fixture)).argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
        for n in (1, 3, 8):
            x = rng.uniform(-1, 1, (n, 3, 48, 192)).astype(np.float32)
            np.testing.assert_allclose(c.execute(layout(fmt, x)), in_process(fmt, x), atol=1e-5)


def test_batching_and_cache_in_every_format(cls_server, tmp_path):
    fmt, server = cls_server
    rows = np.random.default_rng(12).uniform(-1, 1, (24, 1, 3, 48, 192)).astype(np.float32)
    rows = [layout(fmt, r) for r in rows]

    async def together(url):
        async with AsyncClient(url) as c:
            return await asyncio.gather(*(c.execute(r) for r in rows))
    with Client(server.url) as c:
        separate = [c.execute(r) for r in rows]
    merged = asyncio.run(together(server.url))
    for a, b in zip(merged, separate):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert server.stats()["max_batch_rows"] > 1

    path, flags, _ = CLS[fmt]
    with Server("--model", str(path), *flags, "--cache", "--cache-dir", str(tmp_path)) as s, \
            Client(s.url) as c:
        x = np.concatenate(rows[:4])
        first = c.execute(x)
        eventually(lambda: s.info()["cache"]["writes"] >= 4, 30, "the cache writes")
        before = s.rows_computed()
        np.testing.assert_array_equal(c.execute(x), first)
        assert s.rows_computed() == before           # every row from the cache
    np.testing.assert_allclose(first, np.concatenate(separate[:4]), atol=1e-5)


def test_silero_vad_torchscript_with_state():
    shapes = "x=-1,576;state=2,-1,128"
    module = torch.jit.load(str(need_shared(VAD_TS)))
    frames = np.random.default_rng(13).uniform(-0.5, 0.5, (5, 1, 576)).astype(np.float32)
    with Server("--model", str(VAD_TS), "--shapes", shapes) as s, Client(s.url) as c:
        info = s.info()
        assert info["batching"]["enabled"] is False          # state is [2,N,128]
        assert [o["name"] for o in info["outputs"]] == ["output0", "output1"]
        state = ref_state = np.zeros((2, 1, 128), np.float32)
        for frame in frames:
            prob, state = c.execute_multi([frame, state], ["x", "state"], None)
            with torch.inference_mode():
                want, ref_state = module(torch.from_numpy(frame), torch.from_numpy(ref_state))
            want, ref_state = want.numpy(), ref_state.numpy()
            np.testing.assert_allclose(prob, want, atol=1e-5)
            np.testing.assert_allclose(state, ref_state, atol=1e-5)


def mapped_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_tensorflow_stays_out_of_the_fronts():
    with Server("--model", str(need_shared(CLS["frozen"][0]))) as s:
        pids = s.info()["processes"]["pids"]
        for pid in pids["fronts"] + [pids["supervisor"]]:
            assert "tensorflow" not in mapped_libraries(pid), pid
        assert "tensorflow" in mapped_libraries(pids["workers"][0])
        assert "serving inputs ['x'] and outputs ['probs']" in s.output()


def test_backend_override_and_load_failures(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "gpserve", "serve", *a],
                                    capture_output=True, text=True, timeout=120)
    r = run("--model", str(need_shared(CLS["onnx"][0])), "--backend", "torch")
    assert r.returncode != 0 and "backend torch" in r.stderr
    r = run("--model", str(CLS["torchscript"][0]))
    assert r.returncode != 0 and "carry no input shapes" in r.stderr
    r = run("--model", str(CLS["savedmodel"][0]), "--signature", "nope")
    assert r.returncode != 0 and "no signature 'nope'" in r.stderr and "serving_default" in r.stderr
    r = run("--model", str(CLS["frozen"][0]), "--inputs", "image")
    assert r.returncode != 0 and "backend tensorflow" in r.stderr and "image" in r.stderr
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    r = run("--model", str(empty))
    assert r.returncode != 0 and "no model in it" in r.stderr and "saved_model.pb" in r.stderr


def test_torchscript_side_file_names_and_shapes(tmp_path):
    src = need_shared(CLS["torchscript"][0])
    model = tmp_path / "cls.pt"
    model.write_bytes(src.read_bytes())
    (tmp_path / "cls.json").write_text(
        '{"inputs": [{"name": "image", "shape": [-1, 3, 48, 192], "dtype": "float32"}],'
        ' "outputs": [{"name": "probs", "shape": [-1, 2], "dtype": "float32"}]}')
    x = np.random.default_rng(14).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    with Server("--model", str(model)) as s, Client(s.url) as c:
        got = c.execute(x, input_name="image", output_name="probs")
    np.testing.assert_allclose(got, in_process("torchscript", x), atol=1e-5)


def test_pytorch_model_exported_to_onnx_is_served(tmp_path):
    """docs/frameworks.md: torch.onnx.export, then serve the .onnx file."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    net.eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 8),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                      dynamo=False)
    x = np.random.default_rng(15).standard_normal((5, 8)).astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    with Server("--model", str(path)) as s, Client(s.url) as c:
        np.testing.assert_allclose(c.execute(x), want, atol=1e-5)


def test_keras_model_served_natively_and_through_tf2onnx(tmp_path):
    """docs/frameworks.md: a Keras model as a SavedModel (native) and as ONNX (tf2onnx)."""
    tf2onnx = pytest.importorskip("tf2onnx", reason="tf2onnx is not installed")
    keras = tf.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), name="x"),
                              keras.layers.Dense(12, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(16).standard_normal((4, 6)).astype(np.float32)
    want = model.predict(x, verbose=0)
    saved = tmp_path / "keras_saved"
    model.export(str(saved))                          # Keras 3: a TF SavedModel
    with Server("--model", str(saved)) as s, Client(s.url) as c:
        np.testing.assert_allclose(c.execute(x), want, atol=1e-5)
    spec = (tf.TensorSpec((None, 6), tf.float32, name="x"),)
    onnx_path = tmp_path / "keras.onnx"
    tf2onnx.convert.from_function(tf.function(lambda t: model(t)), input_signature=spec,
                                  output_path=str(onnx_path), opset=17)
    with Server("--model", str(onnx_path)) as s, Client(s.url) as c:
        np.testing.assert_allclose(c.execute(x), want, atol=1e-5)


def test_torch_export_program_is_served(tmp_path):
    """A .pt2 file from torch.export, with a dynamic batch dimension."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.zeros(2, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path / "net.pt2"
    torch.export.save(program, str(path))
    x = np.random.default_rng(17).standard_normal((6, 8)).astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    with Server("--model", str(path), "--shapes", "x=-1,8", "--outputs", "scores") as s, \
            Client(s.url) as c:
        info = s.info()
        assert info["backend"] == "torch" and info["outputs"][0]["name"] == "scores"
        assert info["outputs"][0]["shape"] == [-1, 4]
        np.testing.assert_allclose(c.execute(x), want, atol=1e-5)
