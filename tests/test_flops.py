"""FLOP counts of tiny_config's rack, pinned to numbers worked out by hand.

The rack: d_model 32, 1 block per stack, d_ff 96 (SwiGLU's 8/3 d_model rounded up to
32), time embedding 16, vocabulary 260 (bytes), tied head, seq_len 32, batch 8, 20 steps
per stack. Per token, in multiply-accumulates of one stack:
    attention q, k, v, o   4 * 32 * 32 = 4096
    MLP gate, up, down     3 * 32 * 96 = 9216
    time projection        16 * 32     =  512
                                          13824
so a stack's forward F = 2 * 13824 + attention scores 4 * T * d = 4 * 32 * 32:
F = 27648 + 4096 = 31744, and the head's forward H = 2 * 32 * 260 = 16640.
A phase processes 20 * 8 * 32 = 5120 tokens.
"""

import pytest

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.flops import (baseline_steps, cache_build_flops, end_to_end_flops, forward_flops_per_token,
                                 phase_flops, plan_flops, progressive_budget)
from stackwise_ray.plan import phase_plan, plan_phases

from .conftest import tiny_config

F, H, TOKENS = 31744, 16640, 5120


def grown(config, stacks):
    builder = ProgressiveRackBuilder(config)
    for _ in range(stacks):
        builder.add_stack()
    return builder.build_rack()


def test_forward_flops_of_a_stack():
    rack = grown(tiny_config(), 1)
    assert forward_flops_per_token(rack.stacks[0], 32, 32) == 31744
    assert rack.head.in_features * rack.head.out_features * 2 == H


@pytest.mark.parametrize("mode, head_trains, per_token", [
    ("cached", False, 2 * 16640 + 3 * 31744),            # 128512: the new stack trains, the head passes gradients
    ("forward", False, 2 * 16640 + 3 * 31744 + 31744),   # 160256: the trunk runs once more
    ("backward", False, 2 * 16640 + 3 * 31744 + 2 * 31744),  # 192000: gradients pass through the trunk
    ("trained", False, 2 * 16640 + 3 * 31744 + 3 * 31744),   # 223744: the trunk trains
    ("cached", True, 3 * 16640 + 3 * 31744),             # 145152: an untied head trains
])
def test_phase_flops_by_trunk_treatment_and_head(mode, head_trains, per_token):
    assert phase_flops(grown(tiny_config(), 2), 1, mode, TOKENS, 32, head_trains) == per_token * TOKENS


@pytest.mark.parametrize("settings, model, stack_id, per_token", [
    ({}, {}, 0, 145152),                                  # phase 0: embedding and tied head train: 3H + 3F
    ({}, {}, 1, 128512),                                  # append, frozen, cached: 2H + 3F
    ({"cache_activations": False}, {}, 1, 160256),        # the frozen trunk is recomputed: + F
    ({"building_mode": "prepend"}, {}, 1, 192000),        # the loss flows through the trunk: + 2F
    ({}, {"tie_embeddings": False}, 1, 145152),           # the untied head trains in every phase: 3H + 3F
    ({"trunk_strategy": "full"}, {}, 1, 240384),          # the whole rack trains: 3H + 3F + 3F
])
def test_a_phase_counts_as_its_workers_count_it(settings, model, stack_id, per_token):
    config = tiny_config(model=model, **settings)
    assert plan_flops(phase_plan(config, stack_id), grown(config, stack_id + 1), TOKENS, 32) == per_token * TOKENS


def test_end_to_end_flops():
    assert end_to_end_flops(grown(tiny_config(), 3), 8 * 32, 32) == (3 * 16640 + 9 * 31744) * 256  # 85,917,696


def test_budget_of_a_cached_append_run_and_its_baseline_steps():
    config = tiny_config(target_stacks=3)
    # a cache holds the 20 * 8 = 160 examples its phase reads (of 1000): built by one
    # forward of the newest trunk stack, 31744 * 160 * 32 = 162,529,280 FLOPs
    # phase 0: 145152 * 5120 = 743,178,240; phases 1, 2: 162,529,280 + 128512 * 5120 each
    budget = progressive_budget(config, 1000)
    assert budget == 743_178_240 + 2 * (162_529_280 + 657_981_440) == 2_384_199_680
    assert baseline_steps(config, budget) == 28  # 2,384,199,680 / 85,917,696 = 27.75
    assert progressive_budget(config, 100) == 743_178_240 + 2 * (31744 * 100 * 32 + 657_981_440)  # 100 examples


def test_budget_of_trunk_strategy_full():
    config = tiny_config(target_stacks=3, trunk_strategy="full")
    assert phase_plan(config, 2).cache.kind == "none" and "full" in phase_plan(config, 2).cache.reason
    # no cache; the head trains in every phase: 3H + 3F, 3H + 6F, 3H + 9F
    budget = progressive_budget(config, 1000)
    assert budget == (145152 + 240384 + 335616) * 5120 == 3_692_298_240
    assert baseline_steps(config, budget) == 43  # 3,692,298,240 / 85,917,696 = 42.97


def test_budget_counts_a_trunk_adapter_only_from_the_phase_that_adds_it():
    # rank-2 trunk adapters: q, k, v, o 4 * 2 * (32 + 32) = 512, gate and up 2 * 2 * (32 + 96)
    # = 512, down 2 * (96 + 32) = 256, time 2 * (16 + 32) = 96: 1376 MACs, A = 2752 FLOPs
    config = tiny_config(target_stacks=3, trunk_strategy="qlora", progressive_qlora=True, progressive_qlora_rank=2)
    A = 2752
    per_token = [3 * H + 3 * F,                    # phase 0: stack 0 has no trunk adapter yet
                 2 * H + 3 * F + 2 * (F + A),      # phase 1: trunk inputs cached, stack 0 adapted
                 2 * H + 3 * F + 4 * (F + A)]      # phase 2
    assert per_token == [145152, 197504, 266496]
    assert progressive_budget(config, 1000) == 609152 * 5120 == 3_118_858_240
    # (counted on the final rack, stacks 0 and 1 would carry their adapters in the phases
    # that train them: 6A per token more, 84,541,440 FLOPs)


@pytest.mark.parametrize("settings", [{}, {"trunk_strategy": "full"}, {"building_mode": "prepend"},
                                      {"trunk_strategy": "qlora", "progressive_qlora": True, "progressive_qlora_rank": 2}])
def test_budget_is_the_sum_over_the_plans_of_their_steps_and_cache_builds(settings):
    config = tiny_config(target_stacks=3, **settings)
    total = 0.0
    for k, plan in enumerate(plan_phases(config)):  # each phase on a rack grown from scratch to its size
        total += cache_build_flops(grown(config, k), plan, 160, 32) + plan_flops(plan, grown(config, k + 1), TOKENS, 32)
    assert progressive_budget(config, 1000) == total


def test_per_stack_steps_set_each_phases_flops_cache_rows_and_the_step_matched_baseline():
    from stackwise_ray.cache_policy import CachePlanner
    from stackwise_ray.tune import baseline_plan

    config = tiny_config(target_stacks=3, training={"steps_per_stack": [10, 20, 40]})
    # phase k processes steps_k * 8 * 32 tokens; the cache of phases 1, 2 holds steps_k * 8 examples
    tokens = [10 * 256, 20 * 256, 40 * 256]
    expected = 145152 * tokens[0] + sum(31744 * s * 8 * 32 + 128512 * t for s, t in ((20, tokens[1]), (40, tokens[2])))
    assert progressive_budget(config, 1000) == expected
    from stackwise_ray.data import build_datasets

    train_ds = build_datasets(config)[0]
    planner = CachePlanner(config, None, train_ds, None)
    plans = plan_phases(config)
    assert [planner.steps(p) for p in plans] == [10, 20, 40]
    assert [planner.layout(p).rows for p in plans[1:]] == [160, 320]  # a cache's rows follow its own phase
    config.tune.baseline, config.tune.baseline_match = "end_to_end", "flops_and_steps"
    assert baseline_plan(config, 1000)["steps"] == 70  # as many steps as the three phases together
