"""The default model: a small classifier gpserve trains on first use, so a fresh machine
can serve something real with no files at hand.

It learns the classic three-arm spiral (2-D points -> which arm, a problem no linear
model solves) with a two-hidden-layer MLP, trained in numpy with a fixed seed in about
a second, and exported to ONNX: input ``point`` float32 [N,2], output ``probabilities``
float32 [N,3]. ``spiral_points`` makes labelled points to try it with.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ARMS, HIDDEN = 3, 64


def spiral_points(per_arm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points on three interleaved spiral arms, with their arm (0, 1, 2) as the label."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for arm in range(ARMS):
        r = np.linspace(0.05, 1.0, per_arm)
        theta = arm * 2 * np.pi / ARMS + r * 4.0 + rng.normal(0, 0.08, per_arm)
        points.append(np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1))
        labels.append(np.full(per_arm, arm))
    return np.concatenate(points).astype(np.float32), np.concatenate(labels)


def train(steps: int = 2500, seed: int = 0) -> list[np.ndarray]:
    """Full-batch Adam on cross-entropy; returns [W1, b1, W2, b2, W3, b3]."""
    rng = np.random.default_rng(seed)
    x, y = spiral_points(400, seed)
    onehot = np.eye(ARMS)[y]
    sizes = [(2, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, ARMS)]
    params = []
    for fan_in, fan_out in sizes:
        params += [rng.normal(0, np.sqrt(2 / fan_in), (fan_in, fan_out)), np.zeros(fan_out)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        h1 = np.maximum(x @ params[0] + params[1], 0)
        h2 = np.maximum(h1 @ params[2] + params[3], 0)
        logits = h2 @ params[4] + params[5]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d3 = (p - onehot) / len(x)
        d2 = (d3 @ params[4].T) * (h2 > 0)
        d1 = (d2 @ params[2].T) * (h1 > 0)
        grads = [x.T @ d1, d1.sum(0), h1.T @ d2, d2.sum(0), h2.T @ d3, d3.sum(0)]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= 0.01 * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return [p.astype(np.float32) for p in params]


def export(params: list[np.ndarray], path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = ["w1", "b1", "w2", "b2", "w3", "b3"]
    nodes = [
        helper.make_node("Gemm", ["point", "w1", "b1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["z2"]),
        helper.make_node("Relu", ["z2"], ["h2"]),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "spirals",
        [helper.make_tensor_value_info("point", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", ARMS])],
        initializer=[numpy_helper.from_array(p, n) for p, n in zip(params, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="gpserve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)     # atomic: concurrent first starts never see half a file


def ensure(path: Path) -> Path:
    """Build the default model at ``path`` unless it is already there."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export(train(), path)
    return path
