"""Checkpoints: bit-identical reloads for every precision, checksums, another run's config."""

import json
import re

import pytest
import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.checkpoint import CorruptCheckpointError, load_rack, save_rack
from stackwise_ray.phase_store import phase_identity
from stackwise_ray.plan import plan_phases

from .conftest import tiny_config


def grown(config, n):
    builder = ProgressiveRackBuilder(config)
    for _ in range(n):
        builder.add_stack()
    for p in builder.build_rack().parameters():  # move every float weight off its init
        if p.is_floating_point():
            p.data += 0.01 * torch.randn_like(p)
    return builder


def test_reload_is_bit_identical_for_every_precision_and_both_adapters(tmp_path):
    config = tiny_config(qlora_enabled=True, progressive_qlora=True, qlora_rank=4, building_mode="prepend",
                         stack_precisions={1: "qlora", 2: "nvfp4", 3: "half"}, model={"d_model": 64, "n_heads": 4})
    builder = grown(config, 4)
    rack = builder.build_rack()
    ids = torch.randint(0, 256, (2, 16))
    trained = rack.train()(ids)[0]  # what a training step computes
    with torch.no_grad():  # evaluation, sampling and cache builds run like this, whatever the CPU
        assert torch.equal(rack.eval()(ids)[0], trained)
    save_rack(builder, str(tmp_path))  # after an evaluation
    again = load_rack(str(tmp_path))
    assert again.stack_ids == builder.stack_ids == [3, 2, 1, 0]
    assert torch.equal(again.build_rack().eval()(ids)[0], trained)
    with torch.no_grad():
        assert torch.equal(again.build_rack()(ids)[0], trained)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["stack.safetensors", "trunk.safetensors"]
    meta = json.loads((tmp_path / "rack.json").read_text())
    assert meta["config"]["training"]["progressive"]["building_mode"] == "prepend"  # plain JSON, no pickles
    # time_embedding_dim 16 is narrower than an NF4 block (64) but a whole NVFP4 block (16)
    unquantized = {s["stack_id"]: set(s["unquantized_layers"]) for s in again.get_rack_info()["stacks"]}
    assert unquantized == {0: set(), 1: {"time.proj"}, 2: set(), 3: set()}


def test_altered_file_is_refused(tmp_path):
    save_rack(grown(tiny_config(), 1), str(tmp_path))
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_rack(str(tmp_path))


def test_a_reused_phase_continues_with_the_reusing_runs_config(tmp_path):
    # phase 0 of a prepend/frozen run has the identity of phase 0 of an append/qlora-trunk run
    save_rack(grown(tiny_config(building_mode="prepend", qlora_enabled=True), 1), str(tmp_path))
    mine = tiny_config(building_mode="append", trunk_strategy="qlora", qlora_enabled=True)
    theirs = tiny_config(building_mode="prepend", qlora_enabled=True)
    assert phase_identity(mine, plan_phases(mine, 1), 0) == phase_identity(theirs, plan_phases(theirs, 1), 0)
    builder = load_rack(str(tmp_path), config=mine)
    assert builder.building_mode == "append" and builder.config is mine
    builder.add_stack()
    builder.prepare_phase()
    trunk = builder.stack(0)
    assert builder.build_rack().stacks[-1].stack_id == 1  # appended
    assert {n for n, p in trunk.named_parameters() if p.requires_grad} == {n for n, _ in trunk.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------- a rack from elsewhere

HOSTILE_MODULE = '''
import pathlib
pathlib.Path({marker!r}, "imported").write_text("")


def steps(stack_idx, max_stacks, num_time_steps):
    pathlib.Path({marker!r}, "called").write_text("")
    return num_time_steps - 1 - stack_idx
'''


def rewrite(directory, edit) -> None:
    """Edit rack.json and recompute the checksums, as an attacker who knows the format would."""
    from stackwise_ray.checkpoint import write_checksums

    meta = json.loads((directory / "rack.json").read_text())
    edit(meta)
    (directory / "rack.json").write_text(json.dumps(meta))
    write_checksums(str(directory))


def make_tampered(tmp_path):
    """(original rack dir, its tampered copy, the folder the hostile module writes its marker
    files to, the folder holding the module: put it on sys.path / PYTHONPATH)."""
    import shutil

    original = tmp_path / "rack"
    save_rack(grown(tiny_config(training_objective="clm"), 2), str(original))
    tampered, marker, code = tmp_path / "tampered", tmp_path / "markers", tmp_path / "code"
    shutil.copytree(original, tampered)
    marker.mkdir()
    code.mkdir()
    (code / "hostile_time_mapping.py").write_text(HOSTILE_MODULE.format(marker=str(marker)))

    def edit(meta):
        p = meta["config"]["training"]["progressive"]
        p["stack_time_mapping"], p["custom_time_mapping"] = "custom", "hostile_time_mapping:steps"
    rewrite(tampered, edit)
    return original, tampered, marker, code


def test_a_tampered_rack_loads_without_importing_what_it_names(tmp_path, monkeypatch):
    from stackwise_ray.inference import evaluate_rack

    original, tampered, marker, code = make_tampered(tmp_path)
    monkeypatch.syspath_prepend(str(code))
    ids = torch.randint(0, 256, (2, 16))
    mine = load_rack(str(original))
    theirs = load_rack(str(tampered))
    assert theirs.config.training.progressive.custom_time_mapping == "hostile_time_mapping:steps"
    assert theirs.time_steps == mine.time_steps == {0: 0, 1: 100}  # stored, not recomputed
    assert torch.equal(mine.build_rack().eval()(ids)[0], theirs.build_rack().eval()(ids)[0])
    for builder in (mine, theirs):
        builder.config.data.max_examples = 40
    assert evaluate_rack(theirs) == evaluate_rack(mine)
    with pytest.raises(ValueError, match="is not imported: give stack 2 its time_step"):
        theirs.add_stack()
    assert list(marker.iterdir()) == []


def test_a_rack_whose_files_do_not_match_its_checksums_is_refused(tmp_path):
    from stackwise_ray.checkpoint import write_checksums

    config = tiny_config(qlora_enabled=True, progressive_qlora=True)
    save_rack(grown(config, 2), str(tmp_path))
    sums = tmp_path / "checksums.json"
    listed = sums.read_text()
    sums.write_text("{}")
    with pytest.raises(CorruptCheckpointError, match="rack.json is not listed"):
        load_rack(str(tmp_path))
    sums.write_text(listed)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CorruptCheckpointError, match="notes.txt: not listed in checksums.json"):
        load_rack(str(tmp_path))
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "adapters" / "trunk.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="trunk.safetensors: missing .listed in checksums.json"):
        load_rack(str(tmp_path))
    write_checksums(str(tmp_path))  # the listing agrees again, but rack.json implies a trunk adapter
    with pytest.raises(CorruptCheckpointError, match="trunk.safetensors: missing .rack.json implies"):
        load_rack(str(tmp_path))


def test_a_link_in_a_rack_is_refused(tmp_path):
    save_rack(grown(tiny_config(), 1), str(tmp_path))
    (tmp_path / "tokenizer.json").symlink_to("/dev/zero")  # hashing it would never end
    sums = json.loads((tmp_path / "checksums.json").read_text())
    (tmp_path / "checksums.json").write_text(json.dumps({**sums, "tokenizer.json": "0" * 64}))
    with pytest.raises(CorruptCheckpointError, match="tokenizer.json: not a regular file"):
        load_rack(str(tmp_path))


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["plan"].extend([m["plan"][0]] * 10**5), "plan: must list at most max_stacks=4 stacks"),
    (lambda m: (m["config"]["training"]["progressive"].update(max_stacks=10**5),
                m["plan"].extend([m["plan"][0]] * (10**5 - 1)),
                m["time_steps"].update({str(k): 0 for k in range(10**5)}),
                m["stack_order"].extend(range(1, 10**5))),
     "config.training.progressive.max_stacks: must be in [1, 1,024]"),  # the config's own range comes first
    (lambda m: m["config"]["model"].update(d_model=10**12), "rack.json describes a rack of inf parameters"),
    (lambda m: m["config"]["model"].update(d_model=1e12), "config.model.d_model"),
    (lambda m: m["plan"][0].update(n_blocks=10**9), "rack.json describes a rack of"),
    (lambda m: m["plan"][0].update(n_blocks="1"), "plan.0: must be"),
    (lambda m: m["time_steps"].update({"0": 10**6}), "time_steps.0: must be an int in [0, 1000)"),
    (lambda m: m["time_steps"].pop("0"), "time_steps: must give the time step of each stack 0..0"),
    (lambda m: m["config"]["data"].update(tokenizer="/dev/zero"), "config.data.tokenizer: must be 'byte'"),
    (lambda m: m["config"]["training"]["progressive"].update(custom_time_mapping="os", stack_time_mapping="custom"),
     "custom_time_mapping: must look like 'module:function'"),
    (lambda m: m.update(stack_order=[1]), "stack_order: must be [0]"),
    (lambda m: m.update(format=2), "format: must be 1"),
])
def test_malformed_metadata_is_refused_before_anything_is_built(tmp_path, edit, expected):
    save_rack(grown(tiny_config(), 1), str(tmp_path))
    rewrite(tmp_path, edit)
    with pytest.raises(CorruptCheckpointError, match=re.escape(expected)):
        load_rack(str(tmp_path))


def test_flipped_bytes_in_rack_json_are_one_error(tmp_path):
    from stackwise_ray.checkpoint import write_checksums

    save_rack(grown(tiny_config(), 1), str(tmp_path))
    (tmp_path / "rack.json").write_bytes(b"\xff\xfe{" + (tmp_path / "rack.json").read_bytes())
    write_checksums(str(tmp_path))
    with pytest.raises(CorruptCheckpointError, match="rack.json: not valid JSON"):
        load_rack(str(tmp_path))


def test_a_rack_carries_its_tokenizer_and_must_keep_it(tmp_path):
    from stackwise_ray.checkpoint import write_checksums

    from .test_data import _save_word_level

    _save_word_level(tmp_path / "tok.json", ["[PAD]", "[UNK]", "[MASK]", "a", "b"])
    rack = tmp_path / "rack"
    builder = grown(tiny_config(data={"tokenizer": str(tmp_path / "tok.json")}), 1)
    save_rack(builder, str(rack))
    again = load_rack(str(rack))
    assert again.config.data.tokenizer == str(rack / "tokenizer.json")
    ids = torch.tensor([[3, 4, 3, 0]])
    assert torch.equal(builder.build_rack().eval()(ids)[0], again.build_rack().eval()(ids)[0])
    (rack / "tokenizer.json").unlink()
    write_checksums(str(rack))
    with pytest.raises(CorruptCheckpointError, match="tokenizer.json: missing .rack.json implies"):
        load_rack(str(rack))
