"""A model repository: a folder whose models are served by name, with versions.

Two layouts, so a team can point gpserve at the folder it already has:

- **Triton's**: ``DIR/<name>/<version>/<model>``, versions as integers; ``<model>`` is
  Triton's default file name (``model.onnx``, ``model.pt``, ``model.savedmodel/``,
  ``model.graphdef``) or else the one model file or SavedModel in that folder.
- **Flat**: ``DIR/<file>`` (``resnet.onnx``: the model ``resnet``, version 1), or a
  SavedModel folder (``DIR/<name>/saved_model.pb``).

Beside a model, its own settings (:mod:`gpserve.model_settings`): ``gpserve.toml`` or
Triton's ``config.pbtxt`` in its folder, ``<name>.toml`` beside a flat file.

A version policy picks which versions serve, as Triton's and TF Serving's do: the
latest N (default 1), all, or specific ones. Only reading here: no process, no model is
loaded (what is loaded, and when, is the server's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# by suffix: what a model file may be called (``.onnx.gz``: a compressed ONNX model)
MODEL_SUFFIXES = (".onnx", ".onnx.gz", ".pt", ".pt2", ".torchscript", ".pb", ".graphdef")
TRITON_FILES = ("model.onnx", "model.pt", "model.savedmodel", "model.graphdef")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class RepositoryError(ValueError):
    """The folder is not a repository gpserve can serve; the message says where."""


@dataclass(frozen=True)
class Version:
    number: int
    path: str                   # the model file, or SavedModel folder


@dataclass(frozen=True)
class Entry:
    """One model of the repository: its name, its versions (oldest first), and the
    files of its own settings found beside it (gpserve/model_settings.py)."""

    name: str
    versions: tuple[Version, ...]
    settings: tuple[str, ...] = ()


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions serve: the ``latest`` N, ``all``, or ``specific`` numbers."""

    kind: str = "latest"
    count: int = 1
    numbers: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        """``latest`` / ``latest:N`` / ``all`` / ``specific:1,3``; ValueError says why."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                n = int(arg) if arg else 1
                if n < 1:
                    raise ValueError
                return cls("latest", n)
            if kind == "all" and not arg:
                return cls("all")
            if kind == "specific":
                numbers = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if numbers and min(numbers) >= 1:
                    return cls("specific", numbers=numbers)
        except ValueError:
            pass
        raise ValueError(f"version policy {text!r}: expected latest, latest:N (N >= 1), "
                         "all, or specific:V1,V2 (versions >= 1)")

    def choose(self, versions: tuple[Version, ...]) -> tuple[Version, ...]:
        """The versions to serve, oldest first (none: nothing of this policy exists)."""
        if self.kind == "all":
            return versions
        if self.kind == "latest":
            return versions[-self.count:]
        return tuple(v for v in versions if v.number in self.numbers)


def scan(folder: str | os.PathLike) -> list[Entry]:
    """Every model in ``folder``, by name; RepositoryError if there is none, or if an
    entry cannot be read as a model."""
    root = Path(folder)
    if not root.is_dir():
        raise RepositoryError(f"{root}: not a folder")
    entries = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue                                     # .git, editor files
        entry = _entry(path)
        if entry is not None:
            entries.append(entry)
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RepositoryError(f"{root}: several entries are named {', '.join(twice)} "
                              "(e.g. m.onnx and m.pt): rename one")
    if not entries:
        raise RepositoryError(f"{root}: no model in it (expected model files such as "
                              "name.onnx, <name>/<version>/<model file> as Triton's "
                              "repositories, or a TensorFlow SavedModel: saved_model.pb)")
    return entries


def single(folder: str | os.PathLike, policy: VersionPolicy = VersionPolicy()) -> Entry:
    """The one model of a repository (``--model DIR``), with the versions its policy
    serves; RepositoryError when it holds several or none of the policy's versions."""
    entries = scan(folder)
    if len(entries) > 1:
        raise RepositoryError(f"{folder} holds {len(entries)} models "
                              f"({', '.join(e.name for e in entries)}): name one with "
                              "--model DIR/FILE")
    entry = entries[0]
    chosen = policy.choose(entry.versions)
    if not chosen:
        raise RepositoryError(f"{folder}: model {entry.name!r} has versions "
                              f"{[v.number for v in entry.versions]}, none of them "
                              f"{list(policy.numbers)}")
    return Entry(entry.name, chosen, entry.settings)


def _entry(path: Path) -> Entry | None:
    """A flat model file or SavedModel, or a Triton model folder; None: not a model
    (a README beside the models)."""
    if path.is_file():
        name = _model_name(path.name)
        if name is None:
            return None
        return Entry(_checked(name, path), (Version(1, str(path)),),
                     _existing(path.with_name(f"{name}.toml")))
    if _saved_model(path):
        return Entry(_checked(path.name, path), (Version(1, str(path)),),
                     _existing(path / "gpserve.toml"))
    versions = []
    for sub in path.iterdir():
        if sub.is_dir() and sub.name.isdigit():
            model = _version_model(sub)
            if model is not None:
                versions.append(Version(int(sub.name), str(model)))
    if not versions:
        raise RepositoryError(f"{path}: no version folder with a model (expected "
                              f"{path.name}/1/model.onnx, or another numbered folder)")
    return Entry(_checked(path.name, path), tuple(sorted(versions, key=lambda v: v.number)),
                 _existing(path / "config.pbtxt", path / "gpserve.toml"))


def _existing(*paths: Path) -> tuple[str, ...]:
    return tuple(str(p) for p in paths if p.is_file())


def _version_model(folder: Path) -> Path | None:
    """The model in a version folder: Triton's default name, else its one model."""
    for name in TRITON_FILES:
        if (folder / name).exists():
            return folder / name
    found = [p for p in folder.iterdir()
             if (p.is_file() and _model_name(p.name) is not None) or _saved_model(p)]
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p in found))
        raise RepositoryError(f"{folder}: several models ({names}); keep one per "
                              f"version, or name it {TRITON_FILES[0]}")
    return found[0] if found else None


def _model_name(filename: str) -> str | None:
    for suffix in MODEL_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[:-len(suffix)]
    return None


def _saved_model(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").exists()
                              or (path / "saved_model.pbtxt").exists())


NAME_RULE = ("letters, digits, '_', '.' and '-' only (a model's name is a URL path "
             "segment, a metric label and a file name)")


def valid_name(name: str) -> bool:
    return bool(name) and set(name) <= NAME_CHARS and name not in (".", "..")


def _checked(name: str, path: Path) -> str:
    if not valid_name(name):
        raise RepositoryError(f"{path}: the model name {name!r}: {NAME_RULE}")
    return name
