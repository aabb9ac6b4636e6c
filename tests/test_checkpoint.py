"""Checkpoints: bit-identical reloads for every precision, checksums, another run's config."""

import json

import pytest
import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.checkpoint import CorruptCheckpointError, load_rack, save_rack
from stackwise_ray.phase_store import phase_identity

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
    step = {"n_blocks": 1, "precision": "full"}
    assert (phase_identity(mine, [{**step, "at_input_side": False}], 0)
            == phase_identity(theirs, [{**step, "at_input_side": True}], 0))
    builder = load_rack(str(tmp_path), config=mine)
    assert builder.building_mode == "append" and builder.config is mine
    builder.add_stack()
    builder.prepare_phase()
    trunk = builder.stack(0)
    assert builder.build_rack().stacks[-1].stack_id == 1  # appended
    assert {n for n, p in trunk.named_parameters() if p.requires_grad} == {n for n, _ in trunk.named_parameters() if "lora_" in n}
