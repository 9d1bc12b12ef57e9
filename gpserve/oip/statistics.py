"""Triton's statistics extension: a model's inference statistics in Triton's fields.

REST ``GET /v2/models/stats`` and ``/v2/models/{name}[/versions/{v}]/stats`` answer
this JSON; gRPC ``ModelStatistics`` the same fields as a message. The figures come from
the shared counters (``Counters.statistics``), counted by every front and worker as
they go; durations in nanoseconds, as Triton's. What each one measures here:

- ``success``/``fail``: requests from the decoded request to its outputs (or error) in
  a front; cache hits included, as Triton's.
- ``queue``: time in a worker's queue before the request's batch took it.
- ``compute_input``/``compute_infer``/``compute_output``: a batch's gather and padding,
  the model's run, and its delivery to the fronts; each request of a batch is counted
  with the batch's durations (Triton's way), ``batch_stats`` once per execution by the
  size it ran at (padded). Batches that failed and were re-run request by request are
  not executions.
- ``cache_hit``: requests whose rows the row cache answered all of (the lookup's time);
  ``cache_miss``: the others that looked (the lookup and the store of computed rows).
- ``inference_count``: rows the model computed (not cache hits, not padding);
  ``execution_count``: batches run.
"""
from __future__ import annotations


def _duration(count: int, ns: int) -> dict:
    return {"count": count, "ns": ns}


def model_statistics(name: str, version: str, s: dict) -> dict:
    """One ``model_stats`` entry from ``Counters.statistics()``."""
    return {
        "name": name, "version": version, "last_inference": s["last_inference_ms"],
        "inference_count": s["inferences"], "execution_count": s["executions"],
        "inference_stats": {
            "success": _duration(s["success_count"], s["success_ns"]),
            "fail": _duration(s["fail_count"], s["fail_ns"]),
            "queue": _duration(s["queue_count"], s["queue_ns"]),
            "compute_input": _duration(s["compute_count"], s["compute_input_ns"]),
            "compute_infer": _duration(s["compute_count"], s["compute_infer_ns"]),
            "compute_output": _duration(s["compute_count"], s["compute_output_ns"]),
            "cache_hit": _duration(s["cache_hit_count"], s["cache_hit_ns"]),
            "cache_miss": _duration(s["cache_miss_count"], s["cache_miss_ns"]),
        },
        "response_stats": {},                 # decoupled models' only: none here
        "batch_stats": [
            {"batch_size": size, "compute_input": _duration(count, input_ns),
             "compute_infer": _duration(count, infer_ns),
             "compute_output": _duration(count, output_ns)}
            for size, (count, input_ns, infer_ns, output_ns) in s["batches"].items()],
        "memory_usage": [],
    }
