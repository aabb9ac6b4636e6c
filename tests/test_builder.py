import bitsandbytes as bnb
import pytest
import torch

from stackwise_ray import adapters
from stackwise_ray.builder import ProgressiveRackBuilder, create_stack_from_config
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import train_stack
from stackwise_ray.precision import NVFP4Linear

from .conftest import tiny_config


def batches_for(builder, stack_id, n=2):
    masking = TimeStepMasking(builder.config)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (8, 32))
        out.append(masking.generate_masks_for_stack({"input_ids": ids, "example_ids": torch.arange(8) + 8 * i}, stack_id))
    return out


def run_phase(builder, steps=5):
    builder.prepare_phase()
    stack_id = builder.num_stacks - 1
    return train_stack(builder.build_rack(), batches_for(builder, stack_id), builder.config.training, steps)


def snapshot(module):
    return {n: t.detach().clone() for n, t in module.state_dict().items() if isinstance(t, torch.Tensor)}


def changed(before, module):
    after = snapshot(module)
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_frozen_trunk_is_bit_identical_after_a_phase_and_new_stack_changes():
    builder = ProgressiveRackBuilder(tiny_config(qlora_enabled=True, progressive_qlora=True, qlora_rank=4, progressive_qlora_rank=2))
    builder.append_stack()
    run_phase(builder)
    trunk = builder.stack(0)
    before = snapshot(trunk)
    new = builder.append_stack()
    new_before = snapshot(new)
    run_phase(builder)
    assert changed(before, trunk) == set()
    assert any("lora" in n for n in before)  # the frozen trunk's LoRA was frozen too
    new_changed = changed(new_before, new)
    assert any("blocks.0.attn.q_proj" in n for n in new_changed) and any("lora_B" in n for n in new_changed)


def test_qlora_trunk_trains_only_its_adapters():
    builder = ProgressiveRackBuilder(tiny_config(trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True,
                                                 qlora_rank=4, progressive_qlora_rank=2, new_stack_precision="qlora",
                                                 stack_precisions={0: "full"}))
    builder.append_stack()
    run_phase(builder)
    trunk = builder.stack(0)
    builder.append_stack()
    before = snapshot(trunk)
    run_phase(builder)
    moved = changed(before, trunk)
    assert moved and all("lora_" in n for n in moved)
    assert any(".lora_B.stack." in n for n in moved) and any(".lora_B.trunk." in n for n in moved)
    assert not any("base_layer" in n or "norm" in n for n in moved)


def test_precisions_change_how_weights_are_stored():
    config = tiny_config(qlora_enabled=True, qlora_rank=2, max_stacks=5, model={"d_model": 256, "n_heads": 4})
    builder = ProgressiveRackBuilder(config)
    for precision in ("full", "half", "bfloat16", "qlora", "nvfp4"):
        builder.append_stack(precision=precision)
    q = builder.stack(0).blocks[0].attn.q_proj.base_layer
    assert q.weight.dtype == torch.float32
    assert builder.stack(1).blocks[0].attn.q_proj.base_layer.weight.dtype == torch.float16
    assert builder.stack(2).blocks[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    q4 = builder.stack(3).blocks[0].attn.q_proj.base_layer
    assert isinstance(q4, bnb.nn.Linear4bit) and q4.weight.dtype == torch.uint8
    assert isinstance(builder.stack(4).blocks[0].mlp.down_proj.base_layer, NVFP4Linear)
    info = {s["stack_id"]: s for s in builder.get_rack_info()["stacks"]}
    full = info[0]["weight_bytes"]
    assert info[1]["weight_bytes"] == pytest.approx(full / 2, rel=0.02)
    assert info[3]["weight_bytes"] <= 0.15 * full and info[4]["weight_bytes"] <= 0.15 * full
    assert info[3]["adapter_bytes"] == info[0]["adapter_bytes"] > 0
    assert "emulated" in info[4]["precision_note"]
    logits, _ = builder.build_rack()(torch.randint(0, 256, (2, 16)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_new_stack_position_and_gradient_path(mode):
    builder = ProgressiveRackBuilder(tiny_config(building_mode=mode))
    builder.add_stack()
    run_phase(builder)
    new = builder.add_stack()
    rack = builder.build_rack()
    assert rack.stacks[0 if mode == "prepend" else -1] is new
    builder.prepare_phase()
    seen = []
    trunk = builder.stack(0)
    hook = trunk.register_forward_hook(lambda m, inp, out: seen.append(inp[0].requires_grad))
    batch = batches_for(builder, 1, n=1)[0]
    _, loss = rack(batch["input_ids"], batch["time_step"], batch["targets"], batch["combined_masks"])
    loss.backward()
    hook.remove()
    assert all(p.grad is None for p in trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.blocks.parameters())
    # prepend: the trunk runs on the new stack's output, so the loss reaches the new stack through it
    assert seen == [mode == "prepend"]


@pytest.mark.parametrize("strategy, extra, ranks, alphas", [
    ("simplified", {}, [4, 4, 4], [8, 8, 8]),
    ("progressive", {"qlora_rank_pattern": "increasing", "qlora_alpha_pattern": "constant"}, [4, 8, 16], [8, 8, 8]),
    ("progressive", {"qlora_rank_pattern": "decreasing", "qlora_alpha_pattern": "linear"}, [4, 2, 1], [8, 16, 24]),
    ("progressive", {"qlora_rank_pattern": "linear", "qlora_alpha_pattern": "increasing"}, [4, 8, 12], [8, 16, 32]),
    ("variable", {"qlora_configs": {"0": {"rank": 3, "alpha": 5}, "1": {"rank": 6, "alpha": 7}, "2": {"rank": 9, "alpha": 11}}},
     [3, 6, 9], [5, 7, 11]),
])
def test_rank_and_alpha_per_stack_follow_the_strategy(strategy, extra, ranks, alphas):
    config = tiny_config(qlora_enabled=True, qlora_rank=4, qlora_alpha=8, qlora_strategy=strategy, target_stacks=3,
                         progressive_qlora=True, progressive_qlora_rank=2, progressive_qlora_alpha=3, **extra)
    builder = ProgressiveRackBuilder(config)
    for _ in range(3):
        builder.append_stack()
    for k in range(3):
        found = adapters.adapter_params(builder.stack(k))
        assert found["stack"] == {"rank": ranks[k], "alpha": alphas[k]}
    # the two trunk stacks carry both adapters on the same layer; the newest has only its own
    layer = builder.stack(0).blocks[0].attn.q_proj
    assert set(layer.lora_A) == {"stack", "trunk"} and set(layer.active_adapters) == {"stack", "trunk"}
    assert adapters.adapter_params(builder.stack(1))["trunk"] == {"rank": 2, "alpha": 3}
    assert "trunk" not in adapters.adapter_params(builder.stack(2))


def test_max_stacks_is_enforced():
    builder = ProgressiveRackBuilder(tiny_config(max_stacks=2))
    builder.append_stack()
    builder.prepend_stack()
    with pytest.raises(ValueError, match="max_stacks is 2"):
        builder.append_stack()


def test_builder_from_model_keywords_and_create_stack_from_config():
    builder = ProgressiveRackBuilder(vocab_size=300, d_model=64, d_ff=96, n_heads=4)
    stack = builder.append_stack(n_blocks=3, precision="half")
    assert builder.build_rack().embed.weight.shape == (300, 64)
    assert len(stack.blocks) == 3 and stack.blocks[0].mlp.up_proj.weight.shape == (96, 64)
    assert stack.blocks[0].mlp.up_proj.weight.dtype == torch.float16
    stack = create_stack_from_config(stack_id=2, n_blocks=4, config=tiny_config(time_per_stack=7))
    assert len(stack.blocks) == 4 and stack.time_step == 14


def test_rack_info_counts_trainable_parameters_of_the_phase():
    builder = ProgressiveRackBuilder(tiny_config())
    builder.append_stack()
    builder.append_stack()
    builder.prepare_phase()
    info = builder.get_rack_info()
    new = sum(p.numel() for p in builder.stack(1).parameters())
    norm = sum(p.numel() for p in builder.build_rack().norm.parameters())
    assert info["trainable_params"] == new + norm
    assert [s["trainable_params"] for s in info["stacks"]] == [0, new]
    assert info["stack_order"] == [0, 1] and [s["time_step"] for s in info["stacks"]] == [0, 100]


@pytest.mark.parametrize("mode, settings", [
    ("append", {}),
    ("prepend", {"qlora_enabled": True, "qlora_rank": 4, "new_stack_precision": "nvfp4"}),
    ("append", {"qlora_enabled": True, "qlora_rank": 4, "new_stack_precision": "qlora",  # NF4 needs 64 inputs
                "model": {"d_model": 64, "n_heads": 2}, "time_embedding_dim": 64}),
])
def test_copy_init_starts_equal_to_the_adjacent_trained_stack(mode, settings):
    builder = ProgressiveRackBuilder(tiny_config(new_stack_init="copy", building_mode=mode, **settings))
    builder.add_stack()
    run_phase(builder)  # a trained source: its LoRA B is no longer zero
    source = builder.stack(0)
    trained = snapshot(source)
    new = builder.add_stack()
    assert builder.build_rack().stacks[0 if mode == "prepend" else -1] is new
    mine, theirs = snapshot(new), snapshot(source)
    assert set(mine) == set(theirs) == set(trained) and all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert (new.stack_id, new.time_step, source.time_step) == (1, 100, 0)  # its own depth time
    x, t = torch.randn(2, 8, builder.config.model.d_model), torch.full((2,), 100)
    cos, sin = builder.build_rack().rope_cos[:8], builder.build_rack().rope_sin[:8]
    assert torch.equal(new(x, t, cos, sin, None), source(x, t, cos, sin, None))
    run_phase(builder)
    assert changed(mine, new)  # a copy, not the same tensors


def test_random_init_is_unchanged():
    """The seeded weights of 3 stacks as the builder made them before new_stack_init
    existed (sha256 of the state dict, computed at commit 7a3554e with torch 2.13's CPU
    generator)."""
    import hashlib

    def digest(**settings):
        torch.manual_seed(0)
        builder = ProgressiveRackBuilder(tiny_config(**settings))
        for k in range(3):
            torch.manual_seed(1009 + k)
            builder.add_stack()
        h = hashlib.sha256()
        for name, t in builder.build_rack().state_dict().items():
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    assert digest() == digest(new_stack_init="random") == "9088eb53f568e6af"
    assert digest(building_mode="prepend", qlora_enabled=True, qlora_rank=2, progressive_qlora=True) == "2300f560284e1b40"


@pytest.mark.parametrize("strategy", ["frozen", "full"])
def test_full_trunk_strategy_trains_the_whole_rack(strategy):
    builder = ProgressiveRackBuilder(tiny_config(trunk_strategy=strategy, qlora_enabled=True, qlora_rank=4))
    builder.add_stack()
    run_phase(builder)
    builder.add_stack()
    trunk, embed = builder.stack(0), builder.build_rack().embed.weight
    before, embed_before = snapshot(trunk), embed.detach().clone()
    run_phase(builder)
    if strategy == "frozen":
        assert changed(before, trunk) == set() and torch.equal(embed, embed_before)
    else:  # every trunk weight, its LoRA and norms included, and the embedding train
        assert changed(before, trunk) == set(before) and not torch.equal(embed, embed_before)


def test_full_trunk_strategy_trains_a_4bit_trunk_through_its_adapter():
    builder = ProgressiveRackBuilder(tiny_config(trunk_strategy="full", qlora_enabled=True, qlora_rank=4,
                                                 new_stack_precision="nvfp4"))
    builder.add_stack()
    builder.add_stack()
    builder.prepare_phase()
    trainable = {n for n, p in builder.stack(0).named_parameters() if p.requires_grad}
    assert any(".lora_B.stack." in n for n in trainable) and any("norm" in n for n in trainable)
    assert all(adapters.is_lora_param(n) or "norm" in n or n.startswith("time.") for n in trainable)
    assert all(not b.requires_grad for b in builder.stack(0).buffers())  # the 4-bit codes and scales
