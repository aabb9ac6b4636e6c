"""Save and load a rack: safetensors weights, per-adapter safetensors, JSON metadata.

A checkpoint rebuilds its own model: the metadata holds the config and how each stack
was added (blocks, precision, side, time step), so `load_rack` replays the growth and
loads the weights. No pickles: config objects are stored as plain JSON.

A rack may come from elsewhere, so loading it runs nothing it names: its files must be
exactly those its checksums list, the metadata is checked before anything is built, a
custom time mapping named in its config is never imported (the time steps it was trained
with are stored as data), and the rack it describes must fit in its weights file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from . import storage
from .adapters import STACK_ADAPTER, TRUNK_ADAPTER, is_lora_param
from .builder import ProgressiveRackBuilder
from .config import PRECISIONS, ConfigError, StackWiseConfig
from .model import Block, TimeConditioning
from .storage import read_json, write_json
from .errors import first_line

WEIGHTS = "model.safetensors"
CHECKSUMS = "checksums.json"
METADATA = "rack.json"
TOKENIZER = "tokenizer.json"
MAX_JSON_BYTES = 64 << 20  # metadata is a config, a plan and metrics: far below this


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


def _listed_files(directory: str) -> set[str]:
    """Relative paths of the files under `directory` that checksums cover; a link or a
    special file (a FIFO, a device) is refused, since hashing it could read anything."""
    found = set()
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise CorruptCheckpointError(f"{path}: not a regular file or directory")
        found.update(os.path.relpath(os.path.join(root, n), directory) for n in files)
    return {rel for rel in found if rel != CHECKSUMS and ".tmp" not in os.path.basename(rel)}


def _read_json(path: str):
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        return read_json(path)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpointError(f"{path}: not valid JSON ({type(e).__name__})") from None


def verify_checkpoint(directory: str) -> dict[str, str]:
    """Check that checksums.json lists exactly the files in `directory`, the metadata and
    the weights among them, each with its sha256 (a remote checkpoint is checked in its
    local copy). Returns the listing; raises CorruptCheckpointError naming the first
    missing, unlisted or altered file."""
    try:
        directory = storage.local_path(directory)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory}: missing") from None
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{directory}: no {CHECKSUMS} (incomplete checkpoint)")
    sums = _read_json(path)
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CorruptCheckpointError(f"{path}: must map each file to its sha256")
    for rel in (METADATA, WEIGHTS):
        if rel not in sums:
            raise CorruptCheckpointError(f"{path}: {rel} is not listed (incomplete checkpoint)")
    present = _listed_files(directory)
    for rel in sorted(set(sums) - present):
        raise CorruptCheckpointError(f"{os.path.join(directory, rel)}: missing (listed in {CHECKSUMS})")
    for rel in sorted(present - set(sums)):
        raise CorruptCheckpointError(f"{os.path.join(directory, rel)}: not listed in {CHECKSUMS}")
    for rel in sorted(sums):
        file = os.path.join(directory, rel)
        if sha256_file(file) != sums[rel]:
            raise CorruptCheckpointError(f"{file}: altered (checksum mismatch)")
    return sums


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


def _bad(path: str, key: str, problem: str):
    raise CorruptCheckpointError(f"{path}: {key}: {problem}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_rack_metadata(directory: str, listed: set[str]) -> tuple[dict, StackWiseConfig]:
    """The metadata of a verified checkpoint and its stored config, every field checked
    (the config validated without importing anything it names). `listed` is the set of
    files the checksums cover: it must be exactly what this metadata implies."""
    path = os.path.join(directory, METADATA)
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != 1:
        _bad(path, "format", "must be 1 (a rack.json written by save_rack)")
    try:
        config = StackWiseConfig.from_dict(meta.get("config")).validate()
    except ConfigError as e:
        raise CorruptCheckpointError(f"{path}: config.{e}") from None
    if config.data.tokenizer not in ("byte", TOKENIZER):  # a path elsewhere on this machine: refused
        _bad(path, "config.data.tokenizer", f"must be 'byte' or {TOKENIZER!r}, got {config.data.tokenizer!r}")
    p = config.training.progressive
    plan = meta.get("plan")
    if not isinstance(plan, list) or len(plan) > p.max_stacks:
        _bad(path, "plan", f"must list at most max_stacks={p.max_stacks} stacks")
    for k, step in enumerate(plan):
        if (not isinstance(step, dict) or set(step) != {"n_blocks", "precision", "at_input_side"}
                or not _is_int(step["n_blocks"]) or step["n_blocks"] < 1 or step["precision"] not in PRECISIONS
                or not isinstance(step["at_input_side"], bool)):
            _bad(path, f"plan.{k}", f"must be {{n_blocks: int >= 1, precision: one of {', '.join(PRECISIONS)}, "
                                    f"at_input_side: bool}}, got {str(step)[:200]}")
    steps = meta.get("time_steps")
    if not isinstance(steps, dict) or set(steps) != {str(k) for k in range(len(plan))}:
        _bad(path, "time_steps", f"must give the time step of each stack 0..{len(plan) - 1}")
    for k, step in steps.items():
        if not _is_int(step) or not 0 <= step < p.num_time_steps:
            _bad(path, f"time_steps.{k}", f"must be an int in [0, {p.num_time_steps}), got {step!r}")
    adapters = {STACK_ADAPTER} if plan and p.qlora_enabled else set()
    adapters |= {TRUNK_ADAPTER} if len(plan) > 1 and p.progressive_qlora else set()
    expected = {METADATA, WEIGHTS, *(os.path.join("adapters", f"{a}.safetensors") for a in adapters)}
    expected |= {TOKENIZER} if config.data.tokenizer == TOKENIZER else set()
    for rel in sorted(expected ^ listed):
        problem = "missing" if rel in expected else "not a file of this rack"
        raise CorruptCheckpointError(f"{os.path.join(directory, rel)}: {problem} (rack.json implies {sorted(expected)})")
    if config.data.tokenizer == TOKENIZER:
        config.data.tokenizer = os.path.join(directory, TOKENIZER)
    return meta, config


def rack_params(config: StackWiseConfig, plan: list[dict]) -> int:
    """A lower bound on the parameters of the rack `config` and `plan` describe, counted
    on the meta device (nothing is allocated)."""
    m, p = config.model, config.training.progressive
    with torch.device("meta"):
        block = Block(m.d_model, m.n_heads, m.n_kv_heads or m.n_heads, m.ffn_size,
                      config.causal, m.norm_eps)
        time = TimeConditioning(p.time_encoding_type, p.time_embedding_dim, m.d_model, p.num_time_steps)
    per_block, per_stack = (sum(t.numel() for t in mod.parameters()) for mod in (block, time))
    vocab = m.vocab_size or 1  # the tokenizer's, at least one token
    return vocab * m.d_model + len(plan) * per_stack + sum(s["n_blocks"] for s in plan) * per_block


def check_size(config: StackWiseConfig, plan: list[dict], weights: str) -> None:
    """Refuse a rack bigger than its weights file can hold (4-bit weights take half a byte
    each), before anything is allocated."""
    try:
        params = rack_params(config, plan)
    except (RuntimeError, OverflowError):  # sizes past int64
        params = float("inf")
    if params / 2 > os.path.getsize(weights):
        raise CorruptCheckpointError(f"{os.path.dirname(weights)}: rack.json describes a rack of {params:,} parameters; "
                                     f"{WEIGHTS} holds only {os.path.getsize(weights):,} bytes")


def load_rack(directory: str, device: str | torch.device = "cpu",
              config: StackWiseConfig | None = None) -> ProgressiveRackBuilder:
    """Rebuild the builder (and its rack) saved in `directory` (a path or a storage URI),
    weights loaded; a corrupt checkpoint raises CorruptCheckpointError instead of loading.
    Nothing the checkpoint names is imported: each stack takes its stored time step.

    `config` replaces the saved config: a run reusing another run's phase (same phase
    identity, so the same stacks) continues with its own strategy settings; the stacks
    it adds then take their time steps from its own time mapping."""
    directory = storage.local_path(directory)  # a remote checkpoint: its local copy
    listed = set(verify_checkpoint(directory))
    meta, stored = read_rack_metadata(directory, listed)
    trusted = config is not None
    config = config or stored
    check_size(config, meta["plan"], os.path.join(directory, WEIGHTS))
    builder = ProgressiveRackBuilder(config, building_mode=config.training.progressive.building_mode,
                                     import_code=trusted)
    for k, step in enumerate(meta["plan"]):
        add = builder.prepend_stack if step["at_input_side"] else builder.append_stack
        add(n_blocks=step["n_blocks"], precision=step["precision"], time_step=meta["time_steps"][str(k)])
    if builder.stack_ids != meta.get("stack_order"):
        _bad(os.path.join(directory, METADATA), "stack_order", f"must be {builder.stack_ids} (what the plan builds)")
    try:
        load_weights(builder.build_rack(), os.path.join(directory, WEIGHTS))
    except (ValueError, RuntimeError, KeyError, SafetensorError) as e:  # weights that do not fit this rack
        raise CorruptCheckpointError(f"{os.path.join(directory, WEIGHTS)}: {first_line(e)}") from None
    builder.build_rack().to(device)
    return builder


def finite_weights_problem(rack: torch.nn.Module) -> str | None:
    """Which weight is not finite (NaN or inf), or None. A diverged or tampered rack loads
    (its shapes fit), but every logit it computes is NaN: sampling would fail inside torch."""
    for name, tensor in rack.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"weights are not finite (NaN or inf in {name})"
    return None


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
