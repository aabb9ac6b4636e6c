"""Phase plans: one rule per question, and every consumer reads the plan."""

import pytest

from stackwise_ray import adapters
from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.flops import TRUNK_FACTORS, phase_flops, plan_flops
from stackwise_ray.plan import phase_plan, plan_phases

from .conftest import tiny_config


def test_plan_says_what_each_case_caches():
    assert phase_plan(tiny_config(), 0).cache.kind == "none"
    cached = phase_plan(tiny_config(), 2).cache
    assert (cached.kind, cached.position) == ("trunk_outputs", 2)
    qlora = phase_plan(tiny_config(trunk_strategy="qlora", qlora_enabled=True), 2).cache
    assert (qlora.kind, qlora.position) == ("trunk_inputs", 0)
    assert "prepend" in phase_plan(tiny_config(building_mode="prepend"), 1).cache.reason
    assert phase_plan(tiny_config(cache_activations=False), 1).cache.kind == "none"


# per strategy: phase 1's trunk treatment, cache, whether the embedding and the head train,
# and which trunk parameters the builder lets train
@pytest.mark.parametrize("settings, trunk, cache, embedding, head, trunk_trains", [
    ({}, "cached", "trunk_outputs", False, False, "nothing"),
    ({"cache_activations": False}, "forward", "none", False, False, "nothing"),
    ({"building_mode": "prepend"}, "backward", "none", False, False, "nothing"),
    ({"model": {"tie_embeddings": False}}, "cached", "trunk_outputs", False, True, "nothing"),
    ({"trunk_strategy": "qlora", "qlora_enabled": True}, "backward", "trunk_inputs", False, False, "lora"),
    ({"trunk_strategy": "qlora", "progressive_qlora": True, "progressive_qlora_rank": 2}, "backward", "trunk_inputs",
     False, False, "lora"),
    ({"trunk_strategy": "full"}, "trained", "none", True, True, "all"),
])
def test_the_plan_is_what_the_builder_and_the_flop_count_read(settings, trunk, cache, embedding, head, trunk_trains):
    config = tiny_config(target_stacks=2, **settings)
    plan = plan_phases(config)[1]
    assert (plan.trunk, plan.cache.kind, plan.embedding_trains, plan.head_trains) == (trunk, cache, embedding, head)
    builder = ProgressiveRackBuilder(config)
    for p in plan_phases(config):
        builder.add_planned_stack(p)
    builder.prepare_phase(plan)
    rack = builder.rack
    assert rack.embed.weight.requires_grad == embedding and rack.head.weight.requires_grad == head
    trained = {n for n, p in builder.stack(0).named_parameters() if p.requires_grad}
    lora = {n for n, _ in builder.stack(0).named_parameters() if adapters.is_lora_param(n)}
    assert trained == {"nothing": set(), "lora": lora,
                       "all": {n for n, p in builder.stack(0).named_parameters() if p.is_floating_point()}}[trunk_trains]
    assert all(p.requires_grad for p in builder.stack(1).parameters() if p.is_floating_point())
    # the phase's FLOPs: the new stack 3x, the trunk by the plan's factor, the head 3x or 2x
    assert plan_flops(plan, rack, 1, 32) == phase_flops(rack, 1, trunk, 1, 32, head)
    assert TRUNK_FACTORS[trunk] == {"cached": 0, "forward": 1, "backward": 2, "trained": 3}[trunk]


def test_a_refused_cache_recomputes_the_trunk_as_without_caching():
    plan = phase_plan(tiny_config(), 1)
    refused = plan.recomputed("too big")
    assert (refused.trunk, refused.cache.kind, refused.cache.reason) == ("forward", "none", "too big")
    assert refused.trunk == phase_plan(tiny_config(cache_activations=False), 1).trunk
    assert phase_plan(tiny_config(trunk_strategy="qlora", qlora_enabled=True), 1).recomputed("x").trunk == "backward"


def test_plans_keep_a_builders_stacks_and_fill_up_to_the_target():
    config = tiny_config(target_stacks=3, stack_precisions={2: "bfloat16"})
    builder = ProgressiveRackBuilder(config, default_precision="half")
    builder.prepend_stack(n_blocks=2)
    plans = plan_phases(config, None, builder.plan, builder.default_precision)
    assert [(p.n_blocks, p.precision, p.at_input_side) for p in plans] == [
        (2, "half", True), (1, "half", False), (1, "bfloat16", False)]  # stack_precisions wins over the default
    assert [p.time_step for p in plans] == [0, 100, 200] and [p.stack_id for p in plans] == [0, 1, 2]
    with pytest.raises(ValueError, match="max_stacks"):
        plan_phases(config, config.training.progressive.max_stacks + 1)
    with pytest.raises(ValueError, match="already holds 3 stacks"):
        plan_phases(config, 2, builder.plan * 3)
