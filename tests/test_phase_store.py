"""PhaseStore without Ray: a completion record that cannot be read is a phase not finished."""

import json
import pathlib

import pytest

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.checkpoint import save_rack
from stackwise_ray.phase_store import PhaseStore
from stackwise_ray.plan import plan_phases

from .conftest import tiny_config


@pytest.fixture()
def store(tmp_path):
    """A store with one finished phase, "s00-good"."""
    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()
    store = PhaseStore(str(tmp_path / "phases"))
    save_rack(builder, str(tmp_path / "phases" / "s00-good" / "checkpoint_000000"))
    store.finish("s00-good", {"checkpoint": str(tmp_path / "phases" / "s00-good" / "checkpoint_000000"),
                              "metrics": {"val_loss": 1.0}})
    return store


def write_record(store, phase_id, data: bytes) -> pathlib.Path:
    path = pathlib.Path(store.root, phase_id, "done.json")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data", [
    b"\xff\xfe\x00garbage",  # flipped bytes: not UTF-8
    b'{"checkpoint": "s01-x/checkpoint_000000", "metr',  # a truncated write
    json.dumps({"metrics": {"val_loss": 1.0}}).encode(),  # no checkpoint
    json.dumps({"checkpoint": "s01-x/checkpoint_000000"}).encode(),  # no metrics
    b"[1, 2]",
])
def test_an_unreadable_record_is_a_phase_to_train_again(store, data):
    path = write_record(store, "s01-bad", data)
    assert store.finished_count() == 1 and not store.has_record("s01-bad")
    with pytest.warns(UserWarning, match="phase s01-bad is trained again"):
        assert store.record("s01-bad") is None
    assert not path.exists()  # forgotten, so the next resume does not warn again
    assert store.record("s01-bad") is None
    record = store.record("s00-good")
    assert store.has_record("s00-good") and record["metrics"] == {"val_loss": 1.0}


def test_an_edited_data_file_at_the_same_path_gets_new_phase_ids(tmp_path):
    from stackwise_ray.data import token_store_location
    from stackwise_ray.phase_store import phase_identity

    path = tmp_path / "d.txt"
    path.write_text("x")
    config = tiny_config(data={"source": str(path)})
    config.ray.storage_path = str(tmp_path)
    plan = plan_phases(config, 2)
    keys = []
    for text in ("first version " * 400, "second version " * 400):
        path.write_text(text)
        keys.append(pathlib.Path(token_store_location(config)).name)
    assert keys[0] != keys[1]
    ids = [[phase_identity(config, plan, k, key) for k in range(2)] for key in keys]
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]


def test_a_copy_initialised_phase_is_never_reused_for_a_random_one():
    from stackwise_ray.phase_store import phase_identity

    random, copy, full = tiny_config(), tiny_config(new_stack_init="copy"), tiny_config(trunk_strategy="full")
    plan = plan_phases(random, 2)
    assert phase_identity(random, plan, 0) == phase_identity(copy, plan_phases(copy, 2), 0)  # stack 0 has nothing to copy
    assert phase_identity(random, plan, 1) != phase_identity(copy, plan_phases(copy, 2), 1)
    assert phase_identity(random, plan, 1) != phase_identity(full, plan_phases(full, 2), 1)


def finished_run(store, phase_id: str) -> str:
    """A checkpoint that a run of the phase wrote whole, as Ray Train lays it out."""
    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()
    path = str(pathlib.Path(store.root, phase_id, "run.s00", "checkpoint_000000"))
    save_rack(builder, path, extra={"metrics": {"val_loss": 2.0}})
    return path


def test_a_phase_is_trained_once_then_reused_and_its_record_written(store):
    calls = []

    def train(recovered):
        calls.append(recovered)
        return {"checkpoint": finished_run(store, "s01-new"), "metrics": {"val_loss": 2.0}}, "trained"

    record, status = store.train_once("s01-new", train)
    assert status == "trained" and calls == [None] and store.has_record("s01-new")
    assert store.train_once("s01-new", train)[1] == "reused" and len(calls) == 1
    assert store.train_once("s00-good", train) == (store.record("s00-good"), "reused") and len(calls) == 1
    assert store.record("s01-new")["checkpoint"] == record["checkpoint"]


def test_a_checkpoint_left_before_the_record_is_handed_to_the_phase_to_recover(store):
    left = finished_run(store, "s01-crashed")
    in_phase = pathlib.Path(store.root, "s01-crashed", "run.s00", "checkpoint_000001")  # later, but no final metrics
    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()
    save_rack(builder, str(in_phase), extra={"in_phase": {"step": 2}})
    assert store.finished_checkpoint("s01-crashed") == left
    record, status = store.train_once("s01-crashed", lambda recovered: (
        {"checkpoint": recovered, "metrics": {"val_loss": 2.0}}, "recovered"))
    assert status == "recovered" and record["checkpoint"] == left
    assert store.finished_checkpoint("s01-missing") is None


def test_a_second_run_waits_for_the_claim_and_reuses_what_the_first_trained(store):
    import threading

    started, release, calls = threading.Event(), threading.Event(), []

    def train(recovered):
        calls.append(1)
        started.set()
        release.wait(10)
        return {"checkpoint": finished_run(store, "s01-shared"), "metrics": {"val_loss": 2.0}}, "trained"

    first = threading.Thread(target=store.train_once, args=("s01-shared", train))
    first.start()
    assert started.wait(10)
    results = []
    second = threading.Thread(target=lambda: results.append(store.train_once("s01-shared", train)))
    second.start()
    second.join(0.5)
    assert second.is_alive() and store.try_claim("s01-shared") is None  # waiting on the first one's claim
    release.set()
    first.join(10), second.join(10)
    assert len(calls) == 1 and results[0][1] == "reused"
