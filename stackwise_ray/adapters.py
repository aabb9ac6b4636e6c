"""Stack LoRA and trunk ("progressive") QLoRA adapters through peft (their rank and alpha per
stack come from config.stack_lora_params).

Two named adapters can live on the same projection layers of a stack: `stack` (added
when the stack is created) and `trunk` (added once the stack becomes part of the trunk).
Both are active in the forward pass; which ones train is decided in builder.py.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

STACK_ADAPTER = "stack"
TRUNK_ADAPTER = "trunk"
# attention and MLP projections, and the stack's time projection ("time.proj")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "proj"]


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
