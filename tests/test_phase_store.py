"""PhaseStore without Ray: a completion record that cannot be read is a phase not finished."""

import json
import pathlib

import pytest

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.checkpoint import save_rack
from stackwise_ray.phase_store import PhaseStore

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
    plan = [{"n_blocks": 1, "precision": "full", "at_input_side": False}] * 2
    keys = []
    for text in ("first version " * 400, "second version " * 400):
        path.write_text(text)
        keys.append(pathlib.Path(token_store_location(config)).name)
    assert keys[0] != keys[1]
    ids = [[phase_identity(config, plan, k, key) for k in range(2)] for key in keys]
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]


def test_a_copy_initialised_phase_is_never_reused_for_a_random_one():
    from stackwise_ray.phase_store import phase_identity

    plan = [{"n_blocks": 1, "precision": "full", "at_input_side": False}] * 2
    random, copy = tiny_config(), tiny_config(new_stack_init="copy")
    assert phase_identity(random, plan, 0) == phase_identity(copy, plan, 0)  # stack 0 has nothing to copy
    assert phase_identity(random, plan, 1) != phase_identity(copy, plan, 1)
    assert phase_identity(random, plan, 1) != phase_identity(tiny_config(trunk_strategy="full"), plan, 1)
