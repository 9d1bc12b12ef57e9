"""The status page (``GET /`` from a browser) in a real headless browser: Debian's
chromium, driven by Playwright (it reports the page's console messages and uncaught
errors, waits on the page's own DOM rather than on sleeps, and takes screenshots; the
browser comes from Debian, not from Playwright's download, which this machine cannot
reach). The page loads with no console error, its figures move under load, it shows a
killed worker's restart, and it shows names from the model as text, never as markup. A
screenshot is kept in test-artifacts/."""
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from gpserve.client import Client
from gpserve.testing import Server, eventually

ARTIFACTS = ROOT / "test-artifacts"


def chromium_binary() -> str | None:
    """Debian's chromium; installed here when missing and we may (CI runs as root)."""
    found = shutil.which("chromium")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get "
                       "install -y -qq chromium", shell=True, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    return found


@pytest.fixture(scope="module")
def browser():
    executable = chromium_binary()
    if executable is None:
        pytest.skip("chromium is not installed and cannot be (needs root and apt)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # --no-sandbox: chromium's sandbox needs user namespaces this container lacks
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser, url: str):
    """A page at ``url``, and the list its console errors and uncaught errors go to."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    page.wait_for_selector("section.model")
    return page, problems


def shows(page, selector: str, script: str, timeout_ms: int = 30000) -> None:
    """Wait until ``script`` (a JS expression of ``text``, the element's text) holds."""
    page.wait_for_function(
        f"() => {{ const e = document.querySelector({json.dumps(selector)}); "
        f"if (!e) return false; const text = e.textContent; return {script}; }}",
        timeout=timeout_ms)


def test_the_page_loads_clean_moves_under_load_and_shows_a_restart(browser):
    with Server("--model", "echo", "--fronts", "1", "--placement", "workers") as s:
        page, problems = open_page(browser, s.url + "/")
        assert page.text_content(".model .name") == "echo"
        assert page.text_content(".model .state") == "READY"
        stop = threading.Event()

        def load():
            with Client(s.url) as c:
                while not stop.is_set():
                    c.execute(np.ones((2, 4), np.float32))
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            shows(page, ".model .rows", "text !== '-' && parseFloat(text.replace(/,/g, '')) > 0")
            shows(page, "#p50", "text.startsWith('≤')")
            assert page.locator(".model .bars .bar").count() >= 1
        finally:
            stop.set()
            thread.join(30)
        old = s.info()["processes"]["pids"]["workers"][0]
        shows(page, ".model .workers tbody", f"text.includes('{old}')")
        os.kill(old, signal.SIGKILL)
        shows(page, "#restarts", "text.startsWith('1 workers')")
        eventually(lambda: s.info()["processes"]["pids"]["workers"][0] not in (0, old),
                   what="the worker restarted")
        new = s.info()["processes"]["pids"]["workers"][0]
        shows(page, ".model .workers tbody", f"text.includes('{new}') && text.includes('ready')")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        assert problems == []


def hostile_model(path: Path) -> Path:
    """An ONNX model whose tensor names are markup: the page must show them as text."""
    from onnx import TensorProto, helper
    name_in, name_out = '<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>"
    graph = helper.make_graph(
        [helper.make_node("Identity", [name_in], [name_out])], "hostile",
        [helper.make_tensor_value_info(name_in, TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info(name_out, TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_names_from_the_model_are_text_and_clients_get_json(browser, tmp_path):
    model = hostile_model(tmp_path / "hostile.onnx")
    with Server("--model", str(model), "--fronts", "1") as s:
        for accept in (None, "application/json", "*/*"):
            request = urllib.request.Request(s.url + "/", headers={"Accept": accept} if accept
                                             else {})
            with urllib.request.urlopen(request) as r:
                assert r.headers["content-type"] == "application/json"
                assert json.load(r)["name"] == "hostile"
        with urllib.request.urlopen(urllib.request.Request(
                s.url + "/", headers={"Accept": "text/html"})) as r:
            assert r.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in r.headers["content-security-policy"]
        page, problems = open_page(browser, s.url + "/")
        shows(page, ".model .io tbody", "text.includes('window.pwned=2')")
        names = page.locator(".model .io tbody td:nth-child(2)").all_text_contents()
        assert names == ['<img src=x onerror="window.pwned=1">',
                         "<script>window.pwned=2</script>"]
        assert page.evaluate("window.pwned") is None
        assert page.locator(".model img, .model script").count() == 0
        assert problems == []


def test_the_latency_quantiles_are_bucket_bounds():
    from gpserve.status_page import _quantile
    buckets = [(0.0005, 10), (0.001, 80), (0.0025, 9), (0.005, 1), (float("inf"), 0)]
    assert _quantile(buckets, 0.5) == 1.0 and _quantile(buckets, 0.99) == 2.5
    assert _quantile(buckets, 1.0) == 5.0
    assert _quantile([(0.001, 0), (float("inf"), 0)], 0.5) is None
    assert _quantile([(0.001, 1), (float("inf"), 99)], 0.5) is None     # past the last bound


@pytest.mark.parametrize("accept, html", [
    (b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    (b"*/*", False), (b"application/json", False), (None, False)])
def test_only_browsers_get_the_page(accept, html):
    from gpserve.status_page import wants_html
    headers = [(b"host", b"x")] + ([(b"accept", accept)] if accept else [])
    assert wants_html(headers) is html
