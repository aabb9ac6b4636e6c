"""Stack LoRA and trunk ("progressive") QLoRA adapters through peft.

Two named adapters can live on the same projection layers of a stack: `stack` (added
when the stack is created) and `trunk` (added once the stack becomes part of the trunk).
Both are active in the forward pass; which ones train is decided in builder.py.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:  # config imports this module to check LoRA settings
    from .config import ProgressiveConfig

STACK_ADAPTER = "stack"
TRUNK_ADAPTER = "trunk"
# attention and MLP projections, and the stack's time projection ("time.proj")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "proj"]


def pattern_value(base: float, pattern: str, stack_idx: int) -> float:
    """Value of a rank/alpha pattern at a stack: increasing 16,32,64..; decreasing 16,8,4..
    (never below 1); linear 16,32,48..; constant 16,16,16.."""
    if pattern == "increasing":
        return base * 2**stack_idx
    if pattern == "decreasing":
        return max(1, base / 2**stack_idx)
    if pattern == "linear":
        return base * (stack_idx + 1)
    if pattern == "constant":
        return base
    raise ValueError(f"unknown pattern {pattern!r}")


def stack_lora_params(stack_idx: int, p: ProgressiveConfig) -> tuple[int, float]:
    """(rank, alpha) of stack `stack_idx`'s stack LoRA under qlora_strategy."""
    if p.qlora_strategy == "simplified":
        return p.qlora_rank, p.qlora_alpha
    if p.qlora_strategy == "progressive":
        rank = pattern_value(p.qlora_rank, p.qlora_rank_pattern, stack_idx)
        return int(rank), pattern_value(p.qlora_alpha, p.qlora_alpha_pattern, stack_idx)
    if p.qlora_strategy == "variable":
        entry = p.qlora_configs.get(stack_idx)
        if entry is None:
            raise ValueError(f"training.progressive.qlora_configs: no entry for stack {stack_idx}")
        return int(entry["rank"]), entry["alpha"]
    raise ValueError(f"unknown qlora_strategy {p.qlora_strategy!r}")


def add_adapter(stack: nn.Module, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Add a LoRA adapter called `name` to every projection of `stack`; all adapters stay active."""
    from peft import LoraConfig, inject_adapter_in_model  # imported when needed: it takes seconds

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES)
    with warnings.catch_warnings():  # a second adapter on the same layers is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, stack, adapter_name=name)
    for layer in lora_layers(stack):
        # peft activates only the newest adapter; the source's dual LoRA keeps both on
        layer.set_adapter(sorted(layer.lora_A.keys()))


def lora_layers(module: nn.Module) -> list:
    """peft's LoRA layers in `module` (found by their adapter tables, so peft stays unimported
    in racks that have none)."""
    return [m for m in module.modules() if hasattr(m, "lora_A") and hasattr(m, "set_adapter")]


def adapter_params(module: nn.Module) -> dict[str, dict]:
    """{adapter name: {"rank": r, "alpha": a}} as found on the module's LoRA layers."""
    found = {}
    for layer in lora_layers(module):
        for name in layer.lora_A.keys():
            found[name] = {"rank": layer.r[name], "alpha": layer.lora_alpha[name]}
    return found


def is_lora_param(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")
