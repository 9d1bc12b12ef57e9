"""Where the model comes from: a path, an http(s) URL (downloaded once), echo, or the default."""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_MODEL = "spirals.onnx"


def resolve(model: str, models_dir: str) -> str:
    """A local path (or 'echo') for ``--model``; raises SystemExit with a clear message."""
    if model == "echo":
        return "echo"
    if model.startswith("standin:"):        # a benchmark's stand-in for a GPU model
        from gpserve.workers.standin import parse
        try:
            parse(model)
        except ValueError as e:
            raise SystemExit(f"gpserve: {e}") from None
        return model
    if not model:
        from gpserve.workers.default_model import ensure
        return str(ensure(Path(models_dir) / DEFAULT_MODEL))
    if urllib.parse.urlparse(model).scheme in ("http", "https"):
        return str(download(model, Path(models_dir) / "downloads"))
    if not os.path.exists(model):
        raise SystemExit(f"gpserve: --model {model}: no such file or directory")
    return model


def download(url: str, folder: Path) -> Path:
    """Download ``url`` once into ``folder`` (keyed by the URL), with a progress bar."""
    from tqdm import tqdm

    name = os.path.basename(urllib.parse.urlparse(url).path) or "model"
    target = folder / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(partial, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"gpserve: --model {url}: download failed: {e}") from None
    shutil.move(partial, target)
    return target
