"""Where the model comes from: a path, an http(s) URL (downloaded once), echo, or the default."""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_MODEL = "spirals.onnx"


def resolve(model: str, models_dir: str, sha256: str = "") -> str:
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
        return str(download(model, Path(models_dir) / "downloads", sha256))
    if not os.path.exists(model):
        raise SystemExit(f"gpserve: --model {model}: no such file or directory")
    return model


def in_repository(path: str) -> tuple[str, str]:
    """``--model DIR`` where DIR is a repository of one model (Triton's layout, as
    KServe's storage initializer leaves it in /mnt/models, or a folder holding one model
    file): (its newest version's path, the model's name). Any other path: (it, "")."""
    from gpserve.repository import RepositoryError, single
    folder = Path(path)
    if not folder.is_dir() or (folder / "saved_model.pb").exists() \
            or (folder / "saved_model.pbtxt").exists():
        return path, ""
    try:
        entry = single(folder)
    except RepositoryError as e:
        raise SystemExit(f"gpserve: --model {path}: {e}") from None
    return entry.versions[-1].path, entry.name


PROGRESS_FROM = 4 << 20      # bytes: smaller downloads show no progress bar


def expected_digest(url: str, flag: str) -> str:
    """The SHA-256 the model must have: ``--model-sha256``, or a ``#sha256=HEX`` fragment
    on the URL (pip's convention); "" when neither gives one."""
    fragment = urllib.parse.urlparse(url).fragment
    given = urllib.parse.parse_qs(fragment).get("sha256", [""])[0]
    if flag and given and flag.lower() != given.lower():
        raise SystemExit(f"gpserve: --model-sha256 {flag} differs from the URL's #sha256="
                         f"{given}")
    digest = (flag or given).lower()
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise SystemExit(f"gpserve: {digest!r} is not a SHA-256 (64 hex digits)")
    return digest


def download(url: str, folder: Path, sha256: str = "") -> Path:
    """Download ``url`` once into ``folder`` (keyed by the URL and digest). The bytes go
    to a temporary file that is renamed into place only once it is whole: as long as
    ``Content-Length`` said, and with the SHA-256 asked for (if any). A download cut
    short is never kept, so the next start downloads again. Progress goes to stderr for
    downloads of over 4 MB."""
    from tqdm import tqdm

    digest = expected_digest(url, sha256)
    plain = urllib.parse.urldefrag(url).url
    name = os.path.basename(urllib.parse.urlparse(plain).path) or "model"
    target = folder / hashlib.sha256(f"{plain}#{digest}".encode()).hexdigest()[:16] / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.part-{os.getpid()}")
    h, got, kept = hashlib.sha256(), 0, False
    try:
        with urllib.request.urlopen(plain, timeout=60) as resp, open(partial, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
                      disable=total is not None and total < PROGRESS_FROM) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise SystemExit(f"gpserve: --model {plain}: download cut short: {got} of the "
                             f"{total} bytes its Content-Length announced; nothing kept, "
                             "the next start downloads again")
        if digest and h.hexdigest() != digest:
            raise SystemExit(f"gpserve: --model {plain}: the download's SHA-256 is "
                             f"{h.hexdigest()}, not {digest}; nothing kept")
        os.replace(partial, target)             # whole and checked: now it is the model
        kept = True
    except OSError as e:
        raise SystemExit(f"gpserve: --model {plain}: download failed: {e}") from None
    finally:
        if not kept:
            partial.unlink(missing_ok=True)
    print(f"gpserve: downloaded {name} ({got} bytes, sha256 {h.hexdigest()})",
          file=sys.stderr)
    return target
