"""A model repository folder (gpserve/repository.py): both layouts read, version
policies, and every folder that cannot be served refused with where and why; and a
server started on a repository of one model (KServe's /mnt/models) serves it by the
repository's name."""
import shutil

import numpy as np
import pytest
import tritonclient.http as hc

from gpserve.client import Client
from gpserve.repository import RepositoryError, Version, VersionPolicy, scan, single
from gpserve.testing import Server


def touch(path, data=b"\x08\x07"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_triton_layout_and_flat_files_side_by_side(tmp_path):
    touch(tmp_path / "ocr" / "1" / "model.onnx")
    touch(tmp_path / "ocr" / "10" / "model.onnx")
    touch(tmp_path / "ocr" / "2" / "other.onnx")            # not Triton's name: its one model
    touch(tmp_path / "ocr" / "config.pbtxt", b"name: 'ocr'")
    touch(tmp_path / "ocr" / "notes", b"")                   # not a version: ignored
    touch(tmp_path / "minilm.onnx.gz")
    touch(tmp_path / "tagger.pt")
    touch(tmp_path / "savedmodel" / "saved_model.pb")
    touch(tmp_path / "README.md", b"# models")
    touch(tmp_path / ".hidden.onnx")
    got = {e.name: [(v.number, v.path.removeprefix(str(tmp_path))) for v in e.versions]
           for e in scan(tmp_path)}
    assert got == {
        "ocr": [(1, "/ocr/1/model.onnx"), (2, "/ocr/2/other.onnx"),
                (10, "/ocr/10/model.onnx")],                 # by number, not by name
        "minilm": [(1, "/minilm.onnx.gz")], "tagger": [(1, "/tagger.pt")],
        "savedmodel": [(1, "/savedmodel")]}


@pytest.mark.parametrize("text, numbers", [
    ("latest", [7]), ("latest:2", [3, 7]), ("latest:9", [1, 3, 7]), ("all", [1, 3, 7]),
    ("specific:3,1", [1, 3]), ("specific:4", [])])
def test_version_policies(text, numbers):
    versions = tuple(Version(n, f"/{n}") for n in (1, 3, 7))
    assert [v.number for v in VersionPolicy.parse(text).choose(versions)] == numbers


@pytest.mark.parametrize("text", ["", "latest:0", "latest:x", "all:2", "specific:",
                                  "specific:0", "newest"])
def test_bad_version_policies_say_what_is_expected(text):
    with pytest.raises(ValueError, match="expected latest"):
        VersionPolicy.parse(text)


@pytest.mark.parametrize("files, words", [
    ([], "no model in it"),
    (["a.onnx", "a.pt"], "several entries are named a"),
    (["m/1/x.onnx", "m/1/y.onnx"], "several models (x.onnx, y.onnx)"),
    (["m/config.pbtxt"], "no version folder with a model"),
    (["m/v1/model.onnx"], "no version folder with a model"),
    (["bad name.onnx"], "'bad name'"),
])
def test_folders_that_cannot_be_served(tmp_path, files, words):
    for f in files:
        touch(tmp_path / f)
    with pytest.raises(RepositoryError) as e:
        scan(tmp_path)
    assert words in str(e.value)


def test_single_takes_the_one_model_and_its_policy(tmp_path):
    touch(tmp_path / "m" / "1" / "model.onnx")
    touch(tmp_path / "m" / "2" / "model.onnx")
    assert [v.number for v in single(tmp_path).versions] == [2]
    with pytest.raises(RepositoryError, match="none of them"):
        single(tmp_path, VersionPolicy.parse("specific:5"))
    touch(tmp_path / "n.onnx")
    with pytest.raises(RepositoryError, match="holds 2 models .m, n.: name one"):
        single(tmp_path)


def test_a_server_on_a_repository_of_one_model(tmp_path, default_model):
    for version in (1, 3):
        touch(tmp_path / "spiral-classifier" / str(version) / "model.onnx", b"")
        shutil.copyfile(default_model,
                        tmp_path / "spiral-classifier" / str(version) / "model.onnx")
    x = np.array([[0.2, 0.3], [-0.5, 0.9]], np.float32)
    with Server("--model", str(tmp_path)) as s:
        assert s.info()["name"] == "spiral-classifier"
        assert str(tmp_path / "spiral-classifier" / "3" / "model.onnx") in s.output()
        c = hc.InferenceServerClient(s.url.removeprefix("http://"))
        assert c.get_model_metadata("spiral-classifier")["name"] == "spiral-classifier"
        inp = hc.InferInput("point", [2, 2], "FP32")
        inp.set_data_from_numpy(x)
        v2 = c.infer("spiral-classifier", [inp])
        with Client(s.url) as gp:
            np.testing.assert_array_equal(gp.execute(x), v2.as_numpy(v2.get_response()[
                "outputs"][0]["name"]))
    with Server("--model", str(tmp_path), "--model-name", "spirals-v3") as s:
        assert s.info()["name"] == "spirals-v3"


def test_unservable_repositories_and_names_stop_the_server_with_the_reason(tmp_path):
    import subprocess
    import sys
    touch(tmp_path / "a.onnx")
    touch(tmp_path / "b.onnx")
    for args, words in ((["--model", str(tmp_path)], "holds 2 models (a, b)"),
                        (["--model", "echo", "--model-name", "a/b"], "--model-name 'a/b'")):
        r = subprocess.run([sys.executable, "-m", "gpserve", "serve", "--listen",
                            "127.0.0.1:1", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and words in r.stderr, r.stderr


def test_graphpipe_clients_reach_the_model_by_url(graphpipe):
    """graphpipe 1.0.4 (unmodified) takes a URL: /models/<name>[/versions/<v>] reaches
    the model by name, over the fast path and uvicorn's; a wrong name is a GraphPipe
    error in Triton's words, and the server serves on."""
    import urllib.request

    from gpserve import protocol as P
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Server("--model", "echo", "--fronts", "1") as s:
        for path in ("/", "/models/echo", "/models/echo/versions/1"):
            got = graphpipe.one("execute", s.url + path, x)
            np.testing.assert_array_equal(got, x)
            assert graphpipe.one("metadata", s.url + path)["name"] == "echo"
        for path, words in (("/models/resnet", "Request for unknown model: 'resnet' is not "
                                               "found"),
                            ("/models/echo/versions/2", "'echo' version 2 is not found"),
                            ("/models/echo/infer", "no GraphPipe route")):
            got = graphpipe.one("execute", s.url + path, x)
            assert got["status"] == 404, got
            err = P.decode_response(got["body"])
            assert err.errors[0].code == 20 and words in err.errors[0].message, err
        # a body too large for the fast path takes uvicorn's: the same answers
        big = np.ones((1000, 80), np.float32)            # 320 KB
        np.testing.assert_array_equal(graphpipe.one("execute", s.url + "/models/echo", big),
                                      big)
        body = P.encode_request(P.InferRequest([big], [], [], ""))
        req = urllib.request.Request(s.url + "/models/nope", data=bytes(body), method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 404 and b"'nope' is not found" in e.value.read()
        assert s.info()["stats"]["errors"] == {"UnknownModel": 4}
