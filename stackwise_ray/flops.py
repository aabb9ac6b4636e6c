"""Training FLOPs per phase, counted from the rack's matmuls (the usual 2·params per token
forward, plus attention's 4·T·d per block), so progressive runs and an end-to-end
baseline are compared at equal compute.

Per token: a module that trains costs 3x its forward (forward, input and weight
gradients); a frozen module that gradients pass through costs 2x; a frozen module whose
output is not differentiated costs 1x; a cached one costs nothing in the steps, and its
cache costs one forward over the training set when it is built.
"""

from __future__ import annotations

import torch.nn as nn


def matmul_params(module: nn.Module) -> int:
    """Multiply-accumulates per token of the module's linear layers (logical sizes, so
    4-bit layers count like full ones; LoRA A/B count too)."""
    total = 0
    for m in module.modules():
        if next(m.children(), None) is None and hasattr(m, "in_features") and hasattr(m, "out_features"):
            total += m.in_features * m.out_features
    return total


def forward_flops_per_token(stack, seq_len: int, d_model: int) -> float:
    return 2.0 * matmul_params(stack) + 4.0 * seq_len * d_model * len(stack.blocks)


def phase_flops(rack, new_stack_id: int, trunk_mode: str, tokens: int, seq_len: int, head_trains: bool) -> float:
    """FLOPs of one phase's training steps.

    Args:
        trunk_mode: "cached" (not run), "forward" (run, no gradient), "backward" (gradients
            pass through it, or its adapters train).
        tokens: tokens processed by the steps (steps x global batch x seq_len).
    """
    d_model = rack.embed.embedding_dim
    per_token = 2.0 * rack.head.in_features * rack.head.out_features * (3 if head_trains else 2)
    factor = {"cached": 0, "forward": 1, "backward": 2}[trunk_mode]
    for stack in rack.stacks:
        f = forward_flops_per_token(stack, seq_len, d_model)
        per_token += 3 * f if stack.stack_id == new_stack_id else factor * f
    return per_token * tokens


def end_to_end_flops(rack, tokens: int, seq_len: int) -> float:
    """Every stack and the head train."""
    per_token = 6.0 * rack.head.in_features * rack.head.out_features
    per_token += sum(3 * forward_flops_per_token(s, seq_len, rack.embed.embedding_dim) for s in rack.stacks)
    return per_token * tokens


def trunk_mode(cache_kind: str, building_mode: str, trunk_strategy: str) -> str:
    if cache_kind == "trunk_outputs":
        return "cached"
    if cache_kind == "trunk_inputs" or building_mode == "prepend" or trunk_strategy == "qlora":
        return "backward"
    return "forward"


def progressive_budget(config, n_train: int) -> float:
    """FLOPs a progressive run of `config` spends (training steps and cache builds), from
    the rack it will build: the budget of the compute-matched end-to-end baseline."""
    from .builder import ProgressiveRackBuilder
    from .cache import plan_cache
    from .phase import phase_steps

    builder = ProgressiveRackBuilder(config)
    for _ in range(config.target_stacks):
        builder.add_stack()
    rack, p = builder.build_rack(), config.training.progressive
    T, B, d = config.data.seq_len, config.data.batch_size, rack.embed.embedding_dim
    tokens = phase_steps(config.training, n_train // B) * B * T
    head = 2.0 * rack.head.in_features * rack.head.out_features
    forward = {s.stack_id: forward_flops_per_token(s, T, d) for s in rack.stacks}
    total = 0.0
    for k in range(config.target_stacks):
        kind = plan_cache(config, k).kind
        factor = {"cached": 0, "forward": 1, "backward": 2}[trunk_mode(kind, p.building_mode, p.trunk_strategy)]
        head_factor = 3 if k == 0 or not config.model.tie_embeddings else 2
        per_token = head * head_factor + 3 * forward[k] + factor * sum(forward[j] for j in range(k))
        total += per_token * tokens
        if kind == "trunk_outputs":
            total += forward[k - 1] * n_train * T  # the incremental cache build
    return total


def baseline_steps(config, budget: float) -> int:
    """Steps of end-to-end training of the final rack that spend `budget` FLOPs."""
    from .builder import ProgressiveRackBuilder

    builder = ProgressiveRackBuilder(config)
    for _ in range(config.target_stacks):
        builder.add_stack()
    T, B = config.data.seq_len, config.data.batch_size
    return max(1, round(budget / end_to_end_flops(builder.build_rack(), B * T, T)))
