"""What a run needs from this machine and the outside world, checked before Ray starts.

`validate()` (config.py) is the schema only; these checks read files, import code and
ask the machine: the data and tokenizer files exist, the tracking packages are
installed, a custom time mapping imports and returns valid steps, and the rack and one
batch fit in this machine's memory. `check` runs them on the config and on every grid
and choice value and range bound of its search space (each a config a trial may get),
so a bad value is refused in one line naming its key before anything starts. The
commands call it through cli.preflight.
"""

from __future__ import annotations

import importlib.util
import os

from .config import BYTES_PER_WEIGHT, StackWiseConfig, apply_overrides
from .errors import ConfigError, clip, fail, first_line, show
from .local_files import source_problem
from .time_mapping import load_time_mapping

MAPPING_KEY = "training.progressive.custom_time_mapping"


def check(config: StackWiseConfig, vocab_size: int | None = None) -> None:
    """Raise ConfigError naming the first key this machine cannot run. `vocab_size`: the
    tokenizer's (None: the byte tokenizer's, or model.vocab_size), for the memory estimate."""
    check_one(config, vocab_size)
    for path, spec in config.tune.search_space.items():
        kind, values = next(iter(spec.items()))
        label = "value" if kind in ("grid", "choice") else "bound"
        for value in values:
            try:
                check_one(apply_overrides(config, {path: value}).validate(), vocab_size)
            except ConfigError as e:
                fail(f"tune.search_space.{path}.{kind}", f"{label} {show(value)}: {e}")


def check_one(config: StackWiseConfig, vocab_size: int | None) -> None:
    check_files(config)
    check_tracking(config)
    check_time_mapping(config)
    check_fits(config, config.model.vocab_size or vocab_size or 260)


def check_files(config: StackWiseConfig) -> None:
    d = config.data
    if d.source != "pydoc" and (problem := _source_problem(d.source)):
        fail("data.source", f"{problem}: {clip(d.source)} (use 'pydoc' for the bundled corpus)")
    if d.tokenizer != "byte" and (problem := source_problem(d.tokenizer)):
        fail("data.tokenizer", f"{problem}: {clip(d.tokenizer)} (use 'byte' for the built-in byte tokenizer)")


def _source_problem(source: str) -> str | None:
    """Why data.source cannot be read: a file, a directory (of shards, or a datasets
    directory) or a glob matching at least one file (what each shard holds is the build's
    to check, naming the shard)."""
    import glob

    from .data.formats import GLOB_CHARS

    if os.path.isdir(source):
        return None
    if any(c in source for c in GLOB_CHARS) and not os.path.exists(source):
        return None if any(os.path.isfile(p) for p in glob.iglob(source, recursive=True)) else "no file matches"
    return source_problem(source)


def check_tracking(config: StackWiseConfig) -> None:
    t = config.tracking
    for key, on, package in (("mlflow", t.mlflow is not None, "mlflow"), ("tensorboard", t.tensorboard, "tensorboard"),
                             ("wandb", t.wandb != "off", "wandb")):
        if on and importlib.util.find_spec(package) is None:
            fail(f"tracking.{key}", f"needs the {package} package: pip install 'stackwise-ray[tracking]'")


def check_time_mapping(config: StackWiseConfig) -> None:
    """Import the custom time mapping the config names (only a user's own config gets here:
    a rack from elsewhere is never preflighted) and call it for every stack the run builds."""
    p = config.training.progressive
    if p.stack_time_mapping != "custom":
        return
    fn = load_time_mapping(p.custom_time_mapping)
    for k in range(config.target_stacks):
        try:
            step = fn(k, p.max_stacks, p.num_time_steps)
        except BaseException as e:  # SystemExit too: a mapping must not end the command
            fail(MAPPING_KEY, f"{clip(p.custom_time_mapping)} raised {type(e).__name__} for stack {k}: {first_line(e)}")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < p.num_time_steps:
            fail(MAPPING_KEY, f"{clip(p.custom_time_mapping)} returned {show(step)} for stack {k}; expected an int in "
                              f"[0, {p.num_time_steps})")


def check_fits(config: StackWiseConfig, vocab_size: int) -> None:
    """Refuse a run whose rack and one batch cannot fit in this machine's memory, before
    anything allocates them, naming the key of the largest term of the estimate."""
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's nodes are not this machine: there Ray's own memory monitor speaks
    memory = _machine_memory()
    weights, activations = footprint(config, vocab_size)
    total = {name: sum(n for _, n in terms) for name, terms in (("weights", weights), ("activations", activations))}
    if memory is not None and sum(total.values()) > memory:
        key = max(weights + activations, key=lambda term: term[1])[0]
        fail(key, f"a rack of {config.target_stacks} stacks needs at least {_bytes(sum(total.values()))} (weights and "
                   f"buffers {_bytes(total['weights'])}, one batch's activations {_bytes(total['activations'])}), "
                   f"more than this machine's {_bytes(memory)}")


def footprint(config: StackWiseConfig, vocab_size: int) -> tuple[list, list]:
    """Lower bounds, in bytes, of the rack's weights and buffers and of one training batch's
    activations (no optimizer state, one hidden state per block), each as a list of
    (the key that drives a term, its bytes)."""
    m, d, p = config.model, config.data, config.training.progressive
    head_dim, n = m.d_model // m.n_heads, config.target_stacks
    blocks = min(config.stack_blocks(k) for k in range(n))  # the smallest stack's: a lower bound
    kv_dim = (m.n_kv_heads or m.n_heads) * head_dim
    d_ff = m.ffn_size
    # bytes per weight of a block, summed over every block of every stack
    per_weight = sum(BYTES_PER_WEIGHT[config.stack_precision(k)] * config.stack_blocks(k) for k in range(n)) / blocks
    table = p.num_time_steps * p.time_embedding_dim if p.time_encoding_type == "learned" else 0
    weights = [
        ("model.vocab_size", 4 * vocab_size * m.d_model * (1 if m.tie_embeddings else 2)),
        ("model.d_model", per_weight * blocks * (2 * m.d_model * (m.d_model + kv_dim) + 2 * m.d_model)),
        ("model.d_ff" if m.d_ff else "model.d_model", per_weight * blocks * 3 * m.d_model * d_ff),
        ("training.progressive.time_embedding_dim", per_weight * (p.time_embedding_dim + 1) * m.d_model),
        ("training.progressive.num_time_steps", per_weight * table),
        ("model.max_seq_len", 4 * m.max_seq_len * head_dim),  # rotary cos and sin tables
    ]
    activations = [
        ("data.batch_size", 4 * d.batch_size * d.seq_len * m.d_model * blocks),
        ("model.vocab_size" if m.vocab_size else "data.batch_size", 4 * d.batch_size * d.seq_len * vocab_size),  # logits
    ]
    return weights, activations


def _machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on this platform
        return None


def _bytes(n: float) -> str:
    if n >= 2**60:
        return f"{n:.1e} bytes"
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"
