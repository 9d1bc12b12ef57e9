"""The supervisor's plan step and restart policy, in-process (the model is read in a
short-lived process, as at a real start): frozen in, frozen out."""
import dataclasses

import pytest

from gpserve.config import Config
from gpserve.plan import Plan, make_plan
from gpserve.supervisor import RESTART_BACKOFF_S, STEADY_S, _Child


def test_the_plan_completes_a_frozen_config_into_a_frozen_plan():
    flags = Config(model="echo", fronts=2, workers=1, threads=0).settle()
    plan = make_plan(flags, run_id="4242")
    assert isinstance(plan, Plan)
    cfg = plan.cfg
    assert (cfg.model_path, cfg.backend, cfg.run_id) == ("echo", "echo", "4242")
    assert cfg.placement == "fronts" and cfg.workers == 2      # echo runs in each front
    assert plan.worker_processes == 0 and plan.spec.echo
    assert flags.placement == "auto" and flags.run_id == ""    # the flags are untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run_id = "other"                                   # type: ignore[misc]


def test_a_model_that_cannot_be_served_as_asked_stops_the_plan_with_the_reason(tmp_path):
    missing = tmp_path / "nothing.onnx"
    with pytest.raises(SystemExit, match="nothing.onnx"):
        make_plan(Config(model=str(missing)).settle(), run_id="1")


def test_a_child_that_keeps_dying_restarts_later_each_time_and_a_steady_one_at_once():
    child = _Child("worker", 0, None, (), Config())
    child.started = 100.0
    delays = []
    for _ in range(len(RESTART_BACKOFF_S) + 1):
        delays.append(child.backoff(now=101.0))                # died a second after start
        child.restarts += 1
    assert delays == [*RESTART_BACKOFF_S, RESTART_BACKOFF_S[-1]]
    assert child.backoff(now=100.0 + STEADY_S + 1) == 0.0
