"""Prestarted phases (prestart.py): the next phase's workers start while this one trains."""

import os
import time

import pytest
import ray
import torch

from stackwise_ray.phase_store import phase_identity
from stackwise_ray.prestart import Prestarter
from stackwise_ray.trainer import ProgressiveTrainer

from .conftest import rack_weights, ray_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_prestarted_and_serial_phases_with_either_cache_backend_train_the_same_weights(arrow_run, tmp_path):
    trainer, _ = arrow_run
    # the arrow run prestarted each next phase (2 CPUs: room for two phases); this one does not
    assert [m["prestarted"] for m in arrow_run[1]] == [False, True, True]
    other = ProgressiveTrainer(ray_config(target_stacks=2), storage_path=str(tmp_path), name="store", prestart=False)
    history = other.train_progressively()
    assert [m["prestarted"] for m in history] == [False, False]
    assert history[1]["cache"]["backend"] == "object_store" and history[1]["trunk_forwards"] == 0
    a, b = rack_weights(arrow_run[1][1]["checkpoint"]), rack_weights(os.path.join(other.run_dir, "final"))
    assert history[1]["phase_id"] == arrow_run[1][1]["phase_id"]  # the cache backend is not part of a phase's identity
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_failed_phase_cancels_the_prestarted_next_phase_and_frees_its_lock(ray_session, tmp_path):
    config = ray_config(ray={"inject_worker_failure": "1:4", "max_failures": 0})
    trainer = ProgressiveTrainer(config, storage_path=str(tmp_path), name="failing", prestart=True)
    t0 = time.time()
    with pytest.raises(Exception):
        trainer.train_progressively()
    assert time.time() - t0 < 240  # no wait for a phase that will never get its inputs
    store = tmp_path / "failing" / "phases"
    assert [p.parent.name[:3] for p in store.glob("*/done.json")] == ["s00"]  # phases 1 and 2 left no record
    key = os.path.basename(trainer.token_store_location())
    ids = [phase_identity(trainer.config, trainer.phase_plans(), k, key) for k in range(3)]
    assert (store / f"{ids[2]}.lock").exists()  # phase 2 was prestarted (it took its lock)...
    assert not list(store.glob(f"{ids[2]}/*/checkpoint_*"))  # ...and never trained
    claim = trainer.store.try_claim(ids[2])
    assert claim is not None  # its lock is free for a rerun
    claim.release()


class Claim:
    def __init__(self):
        self.released = 0

    def release(self):
        self.released += 1


def test_a_prestarted_phase_runs_once_the_phase_before_trains_and_a_cancelled_one_never_runs():
    prestarter = Prestarter(enabled=True)
    try:
        ran, claims = [], {"p1": Claim(), "p2": Claim()}
        prestarter.start("p1", after="p0", lock=claims["p1"], fit=lambda: ran.append("p1") or "fitted")
        prestarter.start("p2", after="p1", lock=claims["p2"], fit=lambda: ran.append("p2"))
        time.sleep(0.5)
        assert ran == [] and prestarter.prestarted("p1").phase_id == "p1"  # waits for phase p0 to train
        prestarter.links.training.remote("p0")
        assert prestarter.prestarted("p1").future.result(timeout=30) == "fitted" and ran == ["p1"]
        prestarter.hand_over("p1", {"handed": True})
        assert ray.get(prestarter.links.inputs.remote("p1")) == {"handed": True}
        prestarter.cancel(prestarter.prestarted("p2"))  # p1 never says it trains: cancel releases the wait
        assert ran == ["p1"] and claims["p2"].released == 1
        assert ray.get(prestarter.links.inputs.remote("p2")) is None  # its workers would return untrained
        assert prestarter.prestarted("p3") is None
    finally:
        prestarter.close()
