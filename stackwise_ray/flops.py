"""Training FLOPs per phase, counted from the rack's matmuls (the usual 2·params per token
forward, plus attention's 4·T·d per block), so progressive runs and an end-to-end
baseline are compared at equal compute.

Per token: a module that trains costs 3x its forward (forward, input and weight
gradients); a frozen module that gradients pass through costs 2x; a frozen module whose
output is not differentiated costs 1x; a cached one costs nothing in the steps, and its
cache costs one forward over the examples the phase reads when it is built.

`phase_flops` is the one count: a phase's workers call it on their rack, and the budget
of the compute-matched baseline calls it on the same rack, grown phase by phase.
"""

from __future__ import annotations

import torch.nn as nn

# what one trunk stack costs per token, in forwards: by how the phase treats the trunk
TRUNK_FACTORS = {"cached": 0, "forward": 1, "backward": 2, "trained": 3}


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


def trunk_mode(cache_kind: str, building_mode: str, trunk_strategy: str) -> str:
    """How a phase treats its trunk: "cached" (not run), "forward" (run, no gradient),
    "backward" (gradients pass through it, or its adapters train), "trained" (its weights
    train: trunk_strategy full)."""
    if trunk_strategy == "full":
        return "trained"
    if cache_kind == "trunk_outputs":
        return "cached"
    if cache_kind == "trunk_inputs" or building_mode == "prepend" or trunk_strategy == "qlora":
        return "backward"
    return "forward"


def phase_flops(rack, new_stack_id: int, trunk_mode: str, tokens: int, seq_len: int, head_trains: bool) -> float:
    """FLOPs of one phase's training steps on `rack` as it is in that phase.

    Args:
        trunk_mode: a key of TRUNK_FACTORS (see trunk_mode()).
        tokens: tokens processed by the steps (steps x global batch x seq_len).
        head_trains: the head's weight trains (3x its forward), else gradients only pass
            through it (2x).
    """
    d_model = rack.embed.embedding_dim
    per_token = 2.0 * rack.head.in_features * rack.head.out_features * (3 if head_trains else 2)
    for stack in rack.stacks:
        f = forward_flops_per_token(stack, seq_len, d_model)
        per_token += 3 * f if stack.stack_id == new_stack_id else TRUNK_FACTORS[trunk_mode] * f
    return per_token * tokens


def end_to_end_flops(rack, tokens: int, seq_len: int) -> float:
    """Every stack and the head train."""
    return phase_flops(rack, -1, "trained", tokens, seq_len, head_trains=True)


def progressive_phase_flops(config, rack, stack_id: int, cache_kind: str, steps: int) -> float:
    """FLOPs of the `steps` training steps of phase `stack_id` of `config` on `rack` (the
    phase's rack), whose trunk is read from a cache of `cache_kind` ("none" when recomputed)."""
    from .builder import head_trains

    p, T = config.training.progressive, config.data.seq_len
    mode = trunk_mode(cache_kind, p.building_mode, p.trunk_strategy)
    return phase_flops(rack, stack_id, mode, steps * config.data.batch_size * T, T, head_trains(config, stack_id))


def progressive_budget(config, n_train: int) -> float:
    """FLOPs a progressive run of `config` over `n_train` training examples spends (training
    steps and cache builds), counted on its rack grown phase by phase as the phases grow it
    (a stack gets its trunk adapter only when the next stack is added): the budget of the
    compute-matched end-to-end baseline."""
    from .builder import ProgressiveRackBuilder
    from .cache import plan_cache
    from .phase import phase_steps

    B, T = config.data.batch_size, config.data.seq_len
    steps = phase_steps(config.training, n_train // B)
    rows = min(n_train, steps * B)  # a cache holds the examples its phase reads, each once
    builder, total = ProgressiveRackBuilder(config), 0.0
    for k in range(config.target_stacks):
        kind = plan_cache(config, k).kind
        if kind == "trunk_outputs":  # built from the previous phase's rack: its newest stack over the rows
            newest = builder.stack(k - 1)
            total += forward_flops_per_token(newest, T, config.model.d_model) * rows * T
        builder.add_stack()
        total += progressive_phase_flops(config, builder.build_rack(), k, kind, steps)
    return total


def baseline_steps(config, budget: float) -> int:
    """Steps of end-to-end training of the final rack that spend `budget` FLOPs."""
    from .builder import ProgressiveRackBuilder

    builder = ProgressiveRackBuilder(config)
    for _ in range(config.target_stacks):
        builder.add_stack()
    T, B = config.data.seq_len, config.data.batch_size
    return max(1, round(budget / end_to_end_flops(builder.build_rack(), B * T, T)))
