"""Save and load a rack: safetensors weights, per-adapter safetensors, JSON metadata.

A checkpoint rebuilds its own model: the metadata holds the config and how each stack
was added (blocks, precision, side), so `load_rack` replays the growth and loads the
weights. No pickles: config objects are stored as plain JSON.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import torch
from safetensors.torch import load_file, save_file, save_model

from . import storage
from .adapters import is_lora_param
from .builder import ProgressiveRackBuilder
from .config import StackWiseConfig
from .storage import read_json, write_json

WEIGHTS = "model.safetensors"
CHECKSUMS = "checksums.json"
METADATA = "rack.json"
TOKENIZER = "tokenizer.json"


class CorruptCheckpointError(ValueError):
    pass


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str) -> None:
    """Record every file's sha256, last, so a truncated or altered file is detected."""
    sums = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != CHECKSUMS and ".tmp" not in name:
                sums[rel] = sha256_file(path)
    write_json(os.path.join(directory, CHECKSUMS), sums)


def verify_checkpoint(directory: str) -> None:
    """Raise CorruptCheckpointError naming the first missing or altered file (a remote
    checkpoint is checked in its local copy)."""
    try:
        directory = storage.local_path(directory)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory}: missing") from None
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{directory}: no {CHECKSUMS} (incomplete checkpoint)")
    for rel, expected in read_json(path).items():
        file = os.path.join(directory, rel)
        if not os.path.isfile(file) or sha256_file(file) != expected:
            raise CorruptCheckpointError(f"{file}: missing or altered (checksum mismatch)")


def save_rack(builder: ProgressiveRackBuilder, directory: str, extra: dict | None = None) -> None:
    """Write the rack under `directory` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    rack = builder.build_rack()
    save_model(rack, os.path.join(directory, WEIGHTS))  # drops the tied head's duplicate storage
    state = rack.state_dict()
    for name in sorted({n.split(".lora_")[1].split(".")[1] for n in state if is_lora_param(n)}):
        tensors = {n: t.contiguous() for n, t in state.items() if f".{name}." in n and is_lora_param(n)}
        os.makedirs(os.path.join(directory, "adapters"), exist_ok=True)
        save_file(tensors, os.path.join(directory, "adapters", f"{name}.safetensors"))
    config = builder.config.to_dict()
    if builder.config.data.tokenizer != "byte":
        shutil.copyfile(builder.config.data.tokenizer, os.path.join(directory, TOKENIZER))
        config["data"]["tokenizer"] = TOKENIZER  # relative to the checkpoint
    write_json(os.path.join(directory, METADATA), {
        "format": 1,
        "config": config,
        "building_mode": builder.building_mode,
        "plan": builder.plan,
        "stack_order": builder.stack_ids,
        "time_steps": {s.stack_id: s.time_step for s in rack.stacks},
        **(extra or {}),
    })
    write_checksums(directory)


def load_metadata(directory: str) -> dict:
    return read_json(storage.join(directory, METADATA))


def load_rack(directory: str, device: str | torch.device = "cpu",
              config: StackWiseConfig | None = None) -> ProgressiveRackBuilder:
    """Rebuild the builder (and its rack) saved in `directory` (a path or a storage URI),
    weights loaded; a corrupt checkpoint raises CorruptCheckpointError instead of loading.

    `config` replaces the saved config: a run reusing another run's phase (same phase
    identity, so the same stacks) continues with its own strategy settings."""
    directory = storage.local_path(directory)  # a remote checkpoint: its local copy
    verify_checkpoint(directory)
    meta = load_metadata(directory)
    if config is None:
        raw = meta["config"]
        if raw["data"]["tokenizer"] == TOKENIZER:
            raw["data"]["tokenizer"] = os.path.join(directory, TOKENIZER)
        config = StackWiseConfig.from_dict(raw)
    builder = ProgressiveRackBuilder(config, building_mode=config.training.progressive.building_mode)
    for step in meta["plan"]:
        add = builder.prepend_stack if step["at_input_side"] else builder.append_stack
        add(n_blocks=step["n_blocks"], precision=step["precision"])
    load_weights(builder.build_rack(), os.path.join(directory, WEIGHTS))
    builder.build_rack().to(device)
    return builder


def load_weights(rack: torch.nn.Module, path: str) -> None:
    """Load a safetensors file into `rack`, restoring bitsandbytes 4-bit weights from their
    stored quant state (a plain load_state_dict does not accept those keys)."""
    state = load_file(path)
    restored = set()
    for name, module in rack.named_modules():
        if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear4bit":
            import bitsandbytes as bnb

            key = f"{name}.weight"
            stats = {k[len(key) + 1:]: state.pop(k) for k in list(state) if k.startswith(key + ".")}
            module.weight = bnb.nn.Params4bit.from_prequantized(
                data=state.pop(key), quantized_stats=stats, requires_grad=False, device=module.weight.device)
            restored.add(key)
    missing, unexpected = rack.load_state_dict(state, strict=False)
    tied = {"head.weight"} if rack.head.weight is rack.embed.weight else set()
    if unexpected or set(missing) - restored - tied:
        raise ValueError(f"{path}: weights do not match the rack: missing {sorted(set(missing) - restored - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
