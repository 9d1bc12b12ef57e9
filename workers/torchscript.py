"""PyTorch backend: TorchScript (``.pt``) and ``torch.export`` programs (``.pt2``).

Their inputs and outputs are positional and their files carry no shapes, so: inputs
are named ``input0..`` and outputs ``output0..`` unless ``--inputs``/``--outputs`` name
them, and shapes (with dtypes) come from ``--shapes`` or a side file ``MODEL.json``:

    --shapes 'x=-1,3,48,192;state=2,-1,128:float32'
    {"inputs": [{"name": "x", "shape": [-1, 3, 48, 192], "dtype": "float32"}],
     "outputs": [{"name": "probs", "shape": [-1, 2]}]}          (outputs optional)

Without output shapes, one forward pass on zeros (every -1 taken as 1) finds how many
outputs there are and their shapes (dimensions that followed the batch stay -1).
Runs on CUDA when the worker has a GPU, under ``torch.inference_mode()``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpserve.modelspec import IOSpec, ModelSpec

from .devices import device_index, usable


def parse_shapes(text: str) -> list[tuple[str, list[int], str]]:
    """``name=d0,d1,...[:dtype];...`` -> [(name, dims, dtype)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, rest = part.partition("=")
        dims, _, dtype = rest.partition(":")
        try:
            shape = [int(d) for d in dims.split(",") if d.strip()]
            np.dtype(dtype or "float32")
        except (ValueError, TypeError):
            raise ValueError(f"--shapes {part!r}: expected name=d0,d1,...[:dtype]") from None
        out.append((name.strip(), shape, dtype or "float32"))
    return out


def _side_file(path: Path) -> dict | None:
    side = path.with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else None


class TorchBackend:
    def __init__(self, path: str, device: str, threads: int, inputs: list[str],
                 outputs: list[str], shapes: str, device_chosen_by_user: bool = True):
        import torch
        torch.set_num_threads(threads)
        self.torch = torch
        device = usable(device, torch.cuda.is_available(), device_chosen_by_user,
                        "PyTorch cannot use CUDA")
        self.device = torch.device(f"cuda:{device_index(device)}"
                                   if device.startswith("cuda") else "cpu")
        if self.device.type == "cuda":
            # cuDNN times its algorithms for each new input shape and keeps the fastest:
            # a cost on the first run of each shape, which the worker's warm-up pays for
            # every batch size it will form. TF32 stays at PyTorch's defaults (on for
            # convolutions, off for matmuls).
            torch.backends.cudnn.benchmark = True
        p = Path(path)
        if p.suffix == ".pt2":
            self.module = torch.export.load(str(p)).module()
            kind = "torch.export program"
        else:
            self.module = torch.jit.load(str(p), map_location=self.device)
            self.module.eval()
            kind = "TorchScript"
        if p.suffix == ".pt2":
            self.module.to(self.device)
        side = _side_file(p) or {}
        declared = parse_shapes(shapes) if shapes else [
            (d["name"], d["shape"], d.get("dtype", "float32")) for d in side.get("inputs", [])]
        if not declared:
            raise ValueError(f"{p.name}: TorchScript and torch.export files carry no input "
                             f"shapes; give them with --shapes or a side file {p.stem}.json")
        names = inputs or [n for n, _, _ in declared]
        if len(names) != len(declared):
            raise ValueError(f"--inputs names {len(names)} inputs, --shapes {len(declared)}")
        in_specs = [IOSpec(n, np.dtype(dt), dims) for n, (_, dims, dt) in zip(names, declared)]
        out_specs = [IOSpec(d["name"], np.dtype(d.get("dtype", "float32")), d["shape"])
                     for d in side.get("outputs", [])] or self._discover_outputs(in_specs)
        if outputs:
            if len(outputs) != len(out_specs):
                raise ValueError(f"--outputs names {len(outputs)} outputs; the model returns "
                                 f"{len(out_specs)}")
            out_specs = [IOSpec(n, s.dtype, s.shape) for n, s in zip(outputs, out_specs)]
        self.order = [s.name for s in out_specs]
        self.spec = ModelSpec(
            name=p.stem, backend="torch", inputs=in_specs, outputs=out_specs,
            batchable=ModelSpec.batch_first(in_specs, out_specs),
            description=f"PyTorch {kind} {p.name} on {self.device}")

    def _discover_outputs(self, in_specs: list[IOSpec]) -> list[IOSpec]:
        probe = {s.name: np.zeros([1 if d < 0 else d for d in s.shape], s.dtype)
                 for s in in_specs}
        outs = self._forward(probe)
        batch_axes = {i for s in in_specs for i, d in enumerate(s.shape) if d < 0}
        specs = []
        for i, out in enumerate(outs):
            shape = [-1 if (a in batch_axes and d == 1) else d for a, d in enumerate(out.shape)]
            specs.append(IOSpec(f"output{i}", out.dtype, shape))
        return specs

    def _forward(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        # The worker's inputs may be read-only shared memory: torch needs writable arrays.
        args = [torch.from_numpy(np.require(a, requirements=["W", "C"])).to(self.device)
                for a in inputs.values()]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        return [r.detach().cpu().numpy() for r in result]

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        ordered = {s.name: inputs[s.name] for s in self.spec.inputs}
        outs = dict(zip(self.order, self._forward(ordered)))
        return [outs[n] for n in output_names]
