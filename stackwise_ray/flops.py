"""Training FLOPs per phase, counted from the rack's matmuls (the usual 2·params per token
forward, plus attention's 4·T·d per block), so progressive runs and an end-to-end
baseline are compared at equal compute.

Per token: a module that trains costs 3x its forward (forward, input and weight
gradients); a frozen module that gradients pass through costs 2x; a frozen module whose
output is not differentiated costs 1x; a cached one costs nothing in the steps, and its
cache costs one forward over the examples the phase reads when it is built.

`phase_flops` is the one count and the phase's PhasePlan (plan.py) says how it treats
the trunk and the head: a phase's workers count their steps with `plan_flops` on their
rack, and the budget of the compute-matched baseline is the sum of the same count over
the run's plans, on a rack grown phase by phase.
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


def phase_flops(rack, new_stack_id: int, trunk_mode: str, tokens: int, seq_len: int, head_trains: bool) -> float:
    """FLOPs of one phase's training steps on `rack` as it is in that phase.

    Args:
        trunk_mode: a key of TRUNK_FACTORS (PhasePlan.trunk).
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


def plan_flops(plan, rack, tokens: int, seq_len: int) -> float:
    """FLOPs of phase `plan`'s training steps over `tokens` tokens on `rack` (the phase's rack)."""
    return phase_flops(rack, plan.stack_id, plan.trunk, tokens, seq_len, plan.head_trains)


def cache_build_flops(rack, plan, rows: int, seq_len: int) -> float:
    """FLOPs of building phase `plan`'s cache of `rows` examples from `rack`, the rack of
    the phase before: a trunk output cache runs the newest trunk stack over the previous
    one (an input cache runs no matmul)."""
    if plan.cache.kind != "trunk_outputs":
        return 0.0
    newest = next(s for s in rack.stacks if s.stack_id == plan.stack_id - 1)
    return forward_flops_per_token(newest, seq_len, rack.embed.embedding_dim) * rows * seq_len


def progressive_budget(config, n_train: int) -> float:
    """FLOPs a progressive run of `config` over `n_train` training examples spends: the sum
    over its phase plans of their training steps and cache builds, each counted on the
    rack as that phase has it (a stack gets its trunk adapter only when the next stack is
    added). The budget of the compute-matched end-to-end baseline."""
    return budget_and_final_rack(config, n_train)[0]


def budget_and_final_rack(config, n_train: int):
    """(progressive_budget, the run's final rack as the budget grew it: the architecture
    the end-to-end baseline trains)."""
    from .builder import ProgressiveRackBuilder
    from .phase import phase_steps
    from .plan import plan_phases

    B, T = config.data.batch_size, config.data.seq_len
    builder, total = ProgressiveRackBuilder(config), 0.0
    for plan in plan_phases(config):
        steps = phase_steps(config.training, n_train // B, plan.stack_id)
        rows = min(n_train, steps * B)  # a cache holds the examples its phase reads, each once
        total += cache_build_flops(builder.rack, plan, rows, T)
        builder.add_planned_stack(plan)
        total += plan_flops(plan, builder.rack, steps * B * T, T)
    return total, builder.rack


def baseline_steps(config, budget: float) -> int:
    """Steps of end-to-end training of the final rack that spend `budget` FLOPs."""
    from .builder import ProgressiveRackBuilder

    builder = ProgressiveRackBuilder(config)
    for _ in range(config.target_stacks):
        builder.add_stack()
    T, B = config.data.seq_len, config.data.batch_size
    return max(1, round(budget / end_to_end_flops(builder.rack, B * T, T)))
