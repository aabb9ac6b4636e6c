"""PhaseStore without Ray: a completion record that cannot be read is a phase not finished."""

import json
import os
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


def two_stack_plans():
    return plan_phases(tiny_config(), 2)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link"])
def test_a_record_naming_a_checkpoint_outside_its_phase_is_no_record(tmp_path, store, where):
    """A done.json pointing at a 1-stack rack elsewhere: never copied, never read as the phase."""
    elsewhere = tmp_path / "elsewhere" / "rack"
    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()
    save_rack(builder, str(elsewhere), extra={"metrics": {"val_loss": 0.1}})
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    phase = pathlib.Path(store.root, "s01-x")
    phase.mkdir()
    if where == "link":
        (phase / "run.s01").symlink_to(elsewhere.parent, target_is_directory=True)
        named = "s01-x/run.s01/rack"
    else:
        named = str(elsewhere) if where == "absolute" else "s01-x/../../elsewhere/rack"
    (phase / "done.json").write_text(json.dumps({"checkpoint": named, "metrics": {"val_loss": 0.1}}))
    with pytest.warns(UserWarning, match="phase s01-x is trained again: its done.json names a checkpoint outside"):
        assert store.record("s01-x", two_stack_plans()) is None
    assert not (phase / "done.json").exists()  # forgotten: the phase trains again
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    assert store.finished_checkpoint("s01-x", two_stack_plans()) is None  # the link is not a run of the phase


def test_a_checkpoint_that_does_not_hold_the_phases_stacks_is_no_record(store):
    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()  # one stack where the phase has two
    path = pathlib.Path(store.root, "s01-y", "run.s01", "checkpoint_000000")
    save_rack(builder, str(path), extra={"metrics": {"val_loss": 0.1}})
    store.finish("s01-y", {"checkpoint": str(path), "metrics": {"val_loss": 0.1}})
    with pytest.warns(UserWarning, match="holds 1 stacks; the phase has 2"):
        assert store.record("s01-y", two_stack_plans()) is None
    # the same phase with its two stacks is a record
    builder.add_stack()
    save_rack(builder, str(path), extra={"metrics": {"val_loss": 0.1}})
    store.finish("s01-y", {"checkpoint": str(path), "metrics": {"val_loss": 0.1}})
    assert store.record("s01-y", two_stack_plans())["checkpoint"] == str(path)


def test_a_linked_done_json_is_removed_as_a_link_and_not_read(tmp_path, store):
    target = tmp_path / "theirs.json"
    target.write_text(json.dumps({"checkpoint": "s00-good/checkpoint_000000", "metrics": {}}))
    phase = pathlib.Path(store.root, "s00-linked")
    phase.mkdir()
    (phase / "done.json").symlink_to(target)
    with pytest.warns(UserWarning, match="is not a completion record"):
        assert store.record("s00-linked") is None
    assert target.exists() and not os.path.lexists(phase / "done.json")
