"""Does batching change a model's answers? A probe at load, and checks on live traffic.

Dynamic batching is transparent only when a row's output does not depend on the rows
batched beside it. Models that break this are common: ONNX Runtime's dynamic
quantization (``DynamicQuantizeLinear`` takes one scale over the whole batch tensor),
batch normalisation left in training mode, anything that reduces over dimension 0.
Kernels may also round differently at different batch sizes; that is noise at the
level of the dtype's precision, not a changed answer.

So a comparison has two numbers: the largest absolute difference between a row run
in a batch and the same row run alone, and that difference relative to the largest
magnitude of the output. A model *changes answers under batching* when the relative
difference passes ``RELATIVE_NOISE`` for its dtype (integer outputs: any difference).

- :func:`probe` runs at load, in the process that inspects the model: rows made up
  from the model's signature (floats scaled differently per row, integers 0 or 1 so
  that vocabulary ids, masks and type ids stay valid), one batch of them against each
  row alone.
- :func:`compare` is what a worker runs on live traffic: one request of a merged
  batch, re-run alone, against its rows of the batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PROBE_ROWS = 4
PROBE_SIZES = (16, 32, 64)       # tried in turn for dynamic non-batch dimensions
RELATIVE_NOISE = {2: 1e-2, 4: 1e-4, 8: 1e-4}   # by float itemsize: fp16, fp32, fp64


@dataclass
class Difference:
    """The largest difference between batched and alone, over all outputs compared."""

    absolute: float = 0.0
    relative: float = 0.0
    changed: bool = False        # past rounding noise for the output's dtype

    def worse(self, other: "Difference") -> "Difference":
        return Difference(max(self.absolute, other.absolute),
                          max(self.relative, other.relative), self.changed or other.changed)


def compare(batched: list[np.ndarray], alone: list[np.ndarray]) -> Difference:
    """How far outputs computed in a batch are from the same rows computed alone."""
    result = Difference()
    for b, a in zip(batched, alone):
        b, a = np.asarray(b), np.asarray(a)
        if b.dtype == object or a.dtype == object:
            changed = b.shape != a.shape or not all(x == y for x, y in zip(b.flat, a.flat))
            result = result.worse(Difference(float(changed), float(changed), changed))
            continue
        if b.shape != a.shape or b.size == 0:
            continue
        if a.dtype.kind in "fc":
            both = np.isfinite(a) & np.isfinite(b)
            nan_mismatch = bool(np.any(np.isnan(a) != np.isnan(b)))
            diff = np.abs(a[both].astype(np.float64) - b[both])
            absolute = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(a[both]).max()) if diff.size else 0.0
            relative = absolute / scale if scale > 0 else (0.0 if absolute == 0 else 1.0)
            noise = RELATIVE_NOISE.get(a.dtype.itemsize, 1e-4)
            changed = relative > noise or nan_mismatch
        else:
            absolute = float(np.abs(a.astype(np.float64) - b).max())
            scale = float(np.abs(a).max())
            relative = absolute / scale if scale > 0 else float(absolute > 0)
            changed = absolute > 0
        result = result.worse(Difference(absolute, relative, changed))
    return result


@dataclass
class ProbeResult:
    """What the probe at load found; ``invariant`` is None when it could not tell."""

    invariant: bool | None
    max_difference: float = 0.0
    relative: float = 0.0
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


VERDICTS = {True: "answers do not depend on the batch",
            False: "ANSWERS CHANGE WITH THE BATCH",
            None: "unknown whether answers depend on the batch"}


def verdict(probe: dict | None, traffic: dict | None = None) -> dict:
    """Does batching change this model's answers? ``invariant`` is True, False, or None
    (not known yet), from the probe at load and the checks on live traffic together."""
    probe = probe or {"invariant": None, "max_difference": 0.0, "relative": 0.0}
    traffic = traffic or {"checks": 0, "changed": 0, "max_difference": 0.0, "relative": 0.0}
    if traffic["changed"] or probe["invariant"] is False:
        invariant = False
    elif probe["invariant"] or traffic["checks"]:
        invariant = True
    else:
        invariant = None
    return {"invariant": invariant,
            "max_difference": max(probe["max_difference"], traffic["max_difference"]),
            "checks": {"probe": probe, "traffic": traffic}}


def made_up_rows(spec, rows: int, size: int = PROBE_SIZES[0],
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray] | None:
    """``rows`` rows the model should accept, dynamic non-batch dimensions ``size``
    (None for models with String inputs): the probe's rows, and a worker's warm-up."""
    rng = rng or np.random.default_rng(0)
    feed = {}
    for s in spec.inputs:
        if s.dtype is None or s.dtype == object:
            return None                                  # String inputs: no safe made-up rows
        shape = [rows] + [size if d == -1 else d for d in s.shape[1:]]
        if s.dtype.kind == "f":
            x = rng.uniform(-1, 1, shape)
            x *= np.arange(1, rows + 1).reshape([-1] + [1] * (len(shape) - 1))
            feed[s.name] = x.astype(s.dtype)
        elif s.dtype.kind == "b":
            feed[s.name] = rng.integers(0, 2, shape).astype(bool)
        else:                        # ids into a vocabulary, masks, type ids: 0 or 1 only
            ids = rng.integers(0, 2, shape)
            if ids.ndim > 1:
                ids.reshape(rows, -1)[:, 0] = 1          # no row is all padding
            feed[s.name] = ids.astype(s.dtype)
    return feed


def probe(backend) -> ProbeResult:
    """Run made-up rows as one batch and one by one; see the module docstring."""
    spec = backend.spec
    if spec.echo:
        return ProbeResult(True, note="echo returns its inputs")
    if not spec.batchable:
        return ProbeResult(None, note="not batched: every request runs alone")
    outputs = [s.name for s in spec.outputs]
    rng = np.random.default_rng(0)
    problems = []
    for size in PROBE_SIZES:
        feed = made_up_rows(spec, PROBE_ROWS, size, rng)
        if feed is None:
            return ProbeResult(None, note="String inputs: checked on live traffic only")
        try:
            batched = backend.run(feed, outputs, "")
            alone = [backend.run({k: v[i:i + 1] for k, v in feed.items()}, outputs, "")
                     for i in range(PROBE_ROWS)]
        except Exception as e:        # the model wants other sizes or values; try again
            problems.append(f"{type(e).__name__}: {str(e)[:200]}")
            continue
        joined = [np.concatenate([a[k] for a in alone]) for k in range(len(outputs))]
        d = compare(batched, joined)
        return ProbeResult(not d.changed, d.absolute, d.relative,
                           f"{PROBE_ROWS} made-up rows, dynamic dimensions {size}")
    return ProbeResult(None, note="the model refused made-up rows (" + "; ".join(
        problems[-1:]) + "); checked on live traffic only")
