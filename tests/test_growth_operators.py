"""Growth operators (new_stack_init copy_trunk, copy_middle, identity): copied weights equal
their source blocks; an identity stack leaves the rack's logits exactly as they were; each
is refused with one line where it cannot apply."""

import pytest
import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.config import ConfigError, StackWiseConfig

from .conftest import tiny_config
from .test_builder import batches_for, run_phase, snapshot


def block_state(block):
    return {n.replace(".base_layer", ""): t for n, t in snapshot(block).items() if ".trunk." not in n}


def grown(op, blocks, mode="append", stacks=3, **settings):
    builder = ProgressiveRackBuilder(tiny_config(new_stack_init=op, building_mode=mode, model={"blocks_per_stack": blocks},
                                                 target_stacks=stacks, **settings))
    for _ in range(stacks - 1):
        builder.add_stack()
        run_phase(builder, steps=3)  # trained sources: no two blocks alike
    trunk = [block for s in builder.rack.stacks for block in s.blocks]  # rack order
    neighbour = builder.rack.stacks[0 if mode == "prepend" else -1]
    trunk_states, time_state = [block_state(b) for b in trunk], snapshot(neighbour.time)
    new = builder.add_stack()
    return builder, new, trunk_states, time_state


@pytest.mark.parametrize("mode, settings", [
    ("append", {}),
    ("prepend", {"qlora_enabled": True, "qlora_rank": 4}),
    ("append", {"qlora_enabled": True, "qlora_rank": 4, "progressive_qlora": True, "trunk_strategy": "qlora"}),
])
def test_copy_trunk_stacks_the_whole_trunk_in_order(mode, settings):
    _, new, trunk, time_state = grown("copy_trunk", [1, 1, 4], mode, **settings)
    assert len(trunk) == 2 and len(new.blocks) == 4
    for i, block in enumerate(new.blocks):  # G_stack: trunk blocks 0, 1, 0, 1
        mine = block_state(block)
        assert set(mine) == set(trunk[i % 2]) and all(torch.equal(mine[n], trunk[i % 2][n]) for n in mine), i
    assert all(torch.equal(t, time_state[n]) for n, t in snapshot(new.time).items())
    assert not all(torch.equal(block_state(new.blocks[0])[n], t) for n, t in trunk[1].items())


def test_copy_middle_copies_the_trunks_middle_blocks():
    _, new, trunk, _ = grown("copy_middle", [3, 1, 2])  # trunk blocks 0 1 2 | 3: the middle two are 1, 2
    assert len(trunk) == 4
    for block, source in zip(new.blocks, (trunk[1], trunk[2])):
        mine = block_state(block)
        assert all(torch.equal(mine[n], source[n]) for n in mine)


@pytest.mark.parametrize("mode, settings", [
    ("append", {}),
    ("prepend", {}),
    ("append", {"qlora_enabled": True, "qlora_rank": 4, "trunk_strategy": "full", "time_encoding_type": "learned"}),
])
def test_identity_growth_leaves_the_logits_exactly_as_they_were(mode, settings):
    builder = ProgressiveRackBuilder(tiny_config(new_stack_init="identity", building_mode=mode, **settings))
    builder.add_stack()
    run_phase(builder, steps=3)
    batch = batches_for(builder, 0, 1)[0]
    rack = builder.rack.eval()
    before, _ = rack(batch["input_ids"], batch["time_step"])
    builder.add_stack()
    after, _ = rack(batch["input_ids"], batch["time_step"])
    assert torch.equal(before, after)
    run_phase(builder, steps=3)  # and it trains away from the identity
    moved, _ = builder.rack.eval()(batch["input_ids"], batch["time_step"])
    assert not torch.equal(before, moved)


@pytest.mark.parametrize("settings, message", [
    ({"new_stack_init": "copy_trunk", "max_stacks": 3},
     "copy_trunk fills stack 2's 2 blocks with copies of the trunk's 4: make each stack's blocks a multiple"),
    ({"new_stack_init": "copy_middle", "max_stacks": 2, "blocks_per_stack": [1, 2]},
     "copy_middle gives stack 1 the middle 2 of the trunk's 1 blocks"),
    ({"new_stack_init": "identity", "max_stacks": 2, "new_stack_precision": "bfloat16"},
     "identity needs full-precision new stacks: stack 1 is bfloat16"),
    ({"new_stack_init": "copy_trunk", "max_stacks": 2, "stack_precisions": {1: "qlora"}, "qlora_enabled": True},
     "copy_trunk gives stack 1 (qlora) blocks of stack 0 (full)"),
    ({"new_stack_init": "copy_middle", "max_stacks": 2, "qlora_enabled": True, "qlora_strategy": "progressive",
      "qlora_rank_pattern": "increasing"}, "copy_middle gives stack 1 the LoRA adapters of stack 0's blocks"),
])
def test_an_operator_that_cannot_apply_is_refused_naming_its_key(settings, message):
    raw = {"model": {"blocks_per_stack": 2}, "training": {"progressive": settings}}
    with pytest.raises(ConfigError) as e:
        StackWiseConfig.from_dict(raw).validate()
    assert str(e.value).startswith(f"training.progressive.new_stack_init: {message}")


def test_copy_into_a_larger_stack_repeats_the_neighbours_blocks():
    _, new, trunk, _ = grown("copy", [1, 1, 2])  # stack 2 copies stack 1's one block, twice (copy_trunk: 0 then 1)
    for block in new.blocks:
        mine = block_state(block)
        assert all(torch.equal(mine[n], trunk[1][n]) for n in mine)
