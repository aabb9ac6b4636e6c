"""StackWiseConfig: typed sections loaded from YAML, with errors that name the key path.

Every section is a plain dataclass, so `config.training.progressive.qlora_rank = 8`
works as the source document shows. `validate()` checks types, ranges and the
combinations that cannot work, raises `ConfigError` with the full key path, and returns
a validated copy (its input is left as it was). This module holds the schema and its
rules only: storage paths live in storage.py, the command-line entry in cli.py, custom
time mappings in time_mapping.py.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .data.formats import FORMATS
from .errors import ConfigError, clip, fail, first_line, show
from .local_files import open_regular
from .time_mapping import MAPPINGS, check_mapping_name, resolve_mapping

PRECISIONS = ("full", "half", "bfloat16", "nvfp4", "qlora")
QUANTIZED_PRECISIONS = ("nvfp4", "qlora")
BYTES_PER_WEIGHT = {"full": 4, "half": 2, "bfloat16": 2, "nvfp4": 0.5, "qlora": 0.5}
# the dtype a stack of each precision computes in (4-bit weights are dequantized to float32)
COMPUTE_DTYPES = {"full": "float32", "half": "float16", "bfloat16": "bfloat16", "nvfp4": "float32", "qlora": "float32"}
BYTE_VOCAB_SIZE = 260  # data.ByteTokenizer: 256 bytes and 4 special ids
# seeds reach torch.manual_seed as seed * 100_003 + epoch, which must stay below 2**63
MAX_SEED = 2**31 - 1
MAX_STACKS = 1024  # validation loops over the stacks (precisions, time steps)
MAX_GRID_POINTS = 1000  # trials in a grid; each grid or choice value is validated as a whole config
MAX_TRIALS = 10_000  # grid points x num_samples: Tune holds every trial in the driver
# one sweep runs in one experiment directory on one Ray: no trial can have its own
SourceFormat = Literal[("auto", *FORMATS)]  # data.format: the formats data/formats.py names
UNSWEPT_KEYS = {"ray.storage_path": "--storage", "ray.address": "--address"}


def can_copy_weights(source: str, new: str) -> bool:
    """Whether new_stack_init: copy can give a `new`-precision stack the weights of a
    `source`-precision one: 4-bit codes copy only into the same 4-bit format."""
    return source == new or (source not in QUANTIZED_PRECISIONS and new not in QUANTIZED_PRECISIONS)


# What a setting can do to a phase: each field declares one (its metadata's "identity"),
# and phase_store.phase_identity hashes exactly the fields whose declaration says so.
HASHED = "hashed"  # can change a phase's weights or the numbers it reports: hashed into every phase's id
TRUNK = "trunk"  # changes how a trunk is treated: hashed into the ids of phases 1.. (phase 0 has no trunk)
PLANNED = "planned"  # reaches the ids through the phase plans (plan.py: a stack's blocks, precision, side,
# LoRA, time step, and a cache dtype that rounds), so two configs with the same plans share phases
IGNORED = "ignored"  # cannot change what a phase produces (tests/test_phase_identity.py trains both ways)
IDENTITIES = (HASHED, TRUNK, PLANNED, IGNORED)


def setting(default=dataclasses.MISSING, identity: str = "", doc: str = "", factory=dataclasses.MISSING,
            added: bool = False):
    """A config field with its one-line meaning and what it can do to a phase (IDENTITIES):
    the phase identity, the configuration reference (docs/configuration.md) and the
    tests read these, so a setting is described once, beside its definition.

    `added`: a setting added after phase stores existed, whose default does what runs
    did before it: at its default it is left out of phase ids, so those stores stay valid."""
    if identity not in IDENTITIES or not doc:
        raise TypeError(f"a setting declares its identity ({', '.join(IDENTITIES)}) and a doc line")
    return field(default=default, default_factory=factory, metadata={"identity": identity, "doc": doc, "added": added})


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = setting(None, HASHED, "ids the embedding holds, at least the tokenizer's largest id + 1; null: exactly that (byte: 260)")
    d_model: int = setting(128, HASHED, "width of the residual stream")
    n_heads: int = setting(4, HASHED, "attention heads; the head size d_model/n_heads must be even (rotary embeddings)")
    n_kv_heads: Optional[int] = setting(None, HASHED, "key/value heads, fewer for grouped KV; null: n_heads")
    d_ff: Optional[int] = setting(None, HASHED, "SwiGLU hidden size; null: 8/3 d_model rounded up to 32")
    blocks_per_stack: int | list = setting(2, PLANNED, "transformer blocks in each stack, or a list with one count per stack (e.g. [4, 4, 8]; copy_trunk grows G_stack-style)")
    max_seq_len: int = setting(128, HASHED, "longest sequence the rack takes (rotary tables, sampling context)")
    attention: Literal["auto", "bidirectional", "causal"] = setting("auto", HASHED, "auto: causal for clm, bidirectional otherwise")
    tie_embeddings: bool = setting(True, HASHED, "the head shares the token embedding")
    rope_theta: float = setting(10000.0, HASHED, "rotary embedding base")
    norm_eps: float = setting(1e-5, HASHED, "RMSNorm epsilon")
    init_std: float = setting(0.02, HASHED, "standard deviation of the initial weights")


    @property
    def ffn_size(self) -> int:
        """d_ff, or SwiGLU's usual 8/3 d_model rounded up to a multiple of 32."""
        return self.d_ff or 32 * -(-(8 * self.d_model // 3) // 32)


@dataclass
class DataConfig:
    source: str = setting("pydoc", HASHED, "pydoc (Python's own documentation, bundled), a .txt (paragraphs), .jsonl or .parquet file (.txt/.jsonl also .gz or .zst), a directory or glob of such shards (sorted order), or a datasets save_to_disk directory; content and shard order are hashed too")
    format: SourceFormat = setting("auto", HASHED, "auto: from each file's extension (a directory with state.json: datasets); else every shard is read as this")
    text_field: str = setting("text", HASHED, "the JSONL/Parquet field holding a record's text")
    target_field: Optional[str] = setting(None, HASHED, "the field holding targets, for training_objective: custom")
    tokenizer: str = setting("byte", HASHED, "byte (UTF-8 bytes and 4 special ids) or a tokenizers JSON file")
    seq_len: int = setting(128, HASHED, "tokens per example window")
    val_fraction: float = setting(0.1, HASHED, "share of the examples held out for validation")
    batch_size: int = setting(16, HASHED, "global batch, split over ray.num_workers; at most the training examples")
    max_examples: Optional[int] = setting(None, HASHED, "use only the first N examples; null: all")
    split_seed: int = setting(0, HASHED, "seed of the train/validation split (fixed when training.seed changes)")


@dataclass
class ProgressiveConfig:
    enabled: bool = setting(True, IGNORED, "the source document's switch; only true is accepted (the end-to-end rack is tune.baseline)")
    trunk_strategy: Literal["frozen", "qlora", "full"] = setting("frozen", TRUNK, "frozen: the trunk does not train; qlora: only its LoRA adapters train; full: the whole rack trains after growth")
    new_stack_init: Literal["random", "copy", "copy_trunk", "copy_middle", "identity"] = setting("random", TRUNK, "copy: a new stack starts as a copy of the trained stack beside it (stack k-1); copy_trunk (G_stack): its blocks copy the whole trunk's, in rack order, repeated to fill it; copy_middle (MIDAS): the trunk's middle blocks; identity: random blocks whose residual outputs (and time projection) start at zero, so the grown rack computes what the trunk did")
    new_stack_precision: Literal["full", "half", "bfloat16", "nvfp4", "qlora"] = setting("full", PLANNED, "precision of stacks stack_precisions does not name")
    cache_activations: bool = setting(True, IGNORED, "cache trunk activations between phases (false: recompute the trunk every step)")
    # stack LoRA: one adapter per stack, added when the stack is created
    qlora_enabled: bool = setting(False, PLANNED, "a LoRA adapter (peft) on every stack when it is created")
    qlora_rank: int = setting(16, PLANNED, "the stack adapters' rank (qlora_strategy simplified; the base of progressive patterns)")
    qlora_alpha: float = setting(32.0, PLANNED, "the stack adapters' alpha")
    qlora_dropout: float = setting(0.0, HASHED, "dropout on the stack adapters' input, in [0, 1)")
    qlora_strategy: Literal["simplified", "progressive", "variable"] = setting("simplified", PLANNED, "simplified: one rank; progressive: rank and alpha patterns; variable: qlora_configs")
    qlora_rank_pattern: Literal["increasing", "decreasing", "linear", "constant"] = setting("constant", PLANNED, "progressive: increasing r*2^k, decreasing r/2^k (at least 1), linear r*(k+1), constant")
    qlora_alpha_pattern: Literal["increasing", "decreasing", "linear", "constant"] = setting("constant", PLANNED, "progressive: the same patterns for alpha")
    qlora_configs: dict = setting(identity=PLANNED, doc="variable: {stack index: {rank, alpha}} for every stack built", factory=dict)
    # progressive (trunk) QLoRA: a second adapter on every trunk stack
    progressive_qlora: bool = setting(False, TRUNK, "a second adapter (trunk) on every stack once it is in the trunk")
    progressive_qlora_rank: int = setting(8, TRUNK, "the trunk adapters' rank")
    progressive_qlora_alpha: float = setting(16.0, TRUNK, "the trunk adapters' alpha")
    max_stacks: int = setting(12, PLANNED, "most stacks a rack may hold (1 to 1024); a custom time mapping receives it")
    target_stacks: Optional[int] = setting(None, IGNORED, "stacks a run trains; null: max_stacks")
    blocks_per_stack: Optional[int | list] = setting(None, PLANNED, "blocks in each stack (a number, or a list with one per stack); null: model.blocks_per_stack")
    stack_precisions: dict = setting(identity=PLANNED, doc="{stack index: precision} overrides of new_stack_precision", factory=dict)
    building_mode: Literal["append", "prepend"] = setting("append", TRUNK, "append: a new stack goes after the trunk; prepend: before it (the loss flows through the trunk)")
    # time
    time_interpretation: Literal["input", "depth"] = setting("depth", HASHED, "depth: each stack's time step follows its index; input: t ~ U[0,1) per example, fed to every stack")
    time_embedding_dim: int = setting(512, HASHED, "width of the time features, projected to d_model in each stack")
    time_encoding_type: Literal["sinusoidal", "learned"] = setting("sinusoidal", HASHED, "sinusoidal features or a learned table")
    stack_time_mapping: str = setting("linear", PLANNED, "linear (k*time_per_stack), exponential (time_per_stack*(2^k-1)), custom, or module:function")
    custom_time_mapping: Optional[str] = setting(None, PLANNED, "module:function f(stack_idx, max_stacks, num_time_steps) -> int, for stack_time_mapping custom; the only code a config can name")
    time_per_stack: int = setting(100, PLANNED, "time steps between consecutive stacks")
    num_time_steps: int = setting(1000, HASHED, "time steps in all; the mask rate runs from min_mask_rate to max_mask_rate over them")
    # objective and corruption
    training_objective: Literal["mlm", "clm", "custom"] = setting("mlm", HASHED, "mlm: masked tokens; clm: next token (last position out of the loss); custom: targets from the data")
    min_mask_rate: float = setting(0.15, HASHED, "mask rate at time step 0")
    max_mask_rate: float = setting(0.9, HASHED, "mask rate at the last time step")
    mask_token_fraction: float = setting(0.8, HASHED, "of the corrupted positions: share given the mask token")
    random_token_fraction: float = setting(0.1, HASHED, "share given a random token; the rest keep their token")


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


@dataclass
class TrainingConfig:
    seed: int = setting(0, HASHED, "training seed (new stacks, batch order, corruption), in [0, 2^31-1]")
    steps_per_stack: int | list = setting(200, HASHED, "optimizer steps in each phase, or a list with one count per stack (grow early or late)")
    epochs_per_stack: Optional[int] = setting(None, HASHED, "if set, each phase trains this many epochs instead of steps_per_stack")
    lr: float = setting(3e-3, HASHED, "peak learning rate (AdamW)")
    min_lr: float = setting(3e-4, HASHED, "learning rate at the schedule's last step")
    warmup_steps: int = setting(20, HASHED, "linear warmup steps: at the start of each phase (per_phase), else once at the start of the run")
    lr_schedule: Literal["per_phase", "run_cosine", "wsd"] = setting("per_phase", HASHED, "per_phase: warmup and cosine to min_lr in every phase; run_cosine: one warmup and one cosine over the run's global step; wsd: one warmup, constant lr, then a linear decay to min_lr over the run's last decay_fraction of steps", added=True)
    decay_fraction: float = setting(0.2, HASHED, "wsd: share of the run's steps (the baseline's: of its own) in the final decay, in (0, 1]", added=True)
    weight_decay: float = setting(0.0, HASHED, "AdamW weight decay")
    grad_clip: float = setting(1.0, HASHED, "gradient norm clip; 0: off")
    eval_batches: int = setting(8, HASHED, "validation batches a phase's final numbers average over (without eval_every)")
    log_every: int = setting(10, IGNORED, "steps between loss-curve points and progress lines")
    checkpoint_every: int = setting(100, IGNORED, "steps between in-phase checkpoints a restarted worker group continues from; 0: only at the end")
    eval_every: int = setting(0, HASHED, "0: off; N: the whole validation split every N steps and at the end (a learning curve; the final numbers then cover the whole split)")
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class RayConfig:
    num_workers: int = setting(1, HASHED, "Ray Train workers per phase (DDP; 2 workers match 1 up to float rounding)")
    use_gpu: bool = setting(False, HASHED, "GPU workers (CUDA kernels compute other float roundings than the CPU's)")
    cpus_per_worker: float = setting(1.0, IGNORED, "CPUs (and torch threads) per worker")
    cache_backend: Literal["object_store", "arrow"] = setting("object_store", IGNORED, "where cache shards live: Ray objects, or Parquet files under the storage path")
    storage_path: str = setting("runs", IGNORED, "root of run directories: a local or mounted path, file://, or an object-store URI (s3://, gs://, ...)")
    address: Optional[str] = setting(None, IGNORED, "Ray cluster address; null: RAY_ADDRESS or a local Ray")
    max_failures: int = setting(2, IGNORED, "worker failures a phase survives (it restarts from its last in-phase checkpoint)")
    cache_max_bytes: Optional[int] = setting(None, IGNORED, "a larger cache is skipped and the trunk recomputed; null: half the object store (arrow: half the free disk; no limit on an object-store storage_path)")
    cache_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = setting(None, PLANNED, "bytes of a cached activation; null: the cached stack's compute dtype (lossless); a narrower one rounds what the phase trains on")
    cache_shard_mb: int = setting(64, IGNORED, "caches are built, stored and read in shards of about this size (1 to 16,384)")
    inject_worker_failure: Optional[str] = setting(None, IGNORED, "testing aid: 'stack:step' makes a worker exit once there")


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class TuneConfig:
    search_space: dict = setting(identity=IGNORED, doc="{key path: {grid|choice|uniform|loguniform|randint: values}}", factory=dict)
    num_samples: int = setting(1, IGNORED, "repeats of the grid (sampled keys are drawn per trial)")
    metric: Literal["val_loss", "val_ppl", "val_accuracy", "val_bpb"] = setting("val_loss", IGNORED, "what the schedulers and the best trial go by")
    mode: Literal["min", "max"] = setting("min", IGNORED, "min or max of metric")
    max_concurrent_trials: int = setting(2, IGNORED, "trials running at once")
    scheduler: Literal["none", "asha", "median"] = setting("none", IGNORED, "Ray Tune's ASHA or median stopping, with stacks_done as the time axis")
    grace_period: int = setting(1, IGNORED, "stacks a trial trains before the scheduler may stop it")
    reduction_factor: float = setting(2.0, IGNORED, "ASHA's reduction factor")
    searcher: Literal["none", "optuna"] = setting("none", IGNORED, "optuna: Ray Tune's OptunaSearch (choice and ranges only)")
    baseline: Literal["none", "end_to_end"] = setting("none", IGNORED, "end_to_end: add the compute-matched baseline trial")
    baseline_match: Literal["flops", "flops_and_steps"] = setting("flops", IGNORED, "flops: the baseline keeps data.batch_size and trains the steps the budget pays for; flops_and_steps: as many steps as a progressive run, its batch fitted to the budget")
    lrs: list = setting(identity=IGNORED, doc="learning rates every arm (and the baseline) runs, min_lr scaled in proportion; []: training.lr", factory=list)
    seeds: list = setting(identity=IGNORED, doc="training seeds every (arm, learning rate) runs; []: training.seed", factory=list)
    share_phases: bool = setting(True, IGNORED, "trials reuse each other's finished phases (false: every trial trains its own)")


@dataclass
class TrackingConfig:
    mlflow: Optional[str] = setting(None, IGNORED, "local (a file store in the run or sweep directory) or a tracking URI")
    tensorboard: bool = setting(False, IGNORED, "event files in RUN_DIR/tensorboard (a sweep: EXPERIMENT_DIR/tensorboard/<trial>)")
    wandb: Literal["off", "offline", "online"] = setting("off", IGNORED, "offline: written locally, `wandb sync` later")
    experiment: Optional[str] = setting(None, IGNORED, "MLflow experiment / W&B project; null: the run's or sweep's name")


@dataclass
class StackWiseConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "StackWiseConfig":
        path = os.fspath(path)
        try:
            with open_regular(path) as f:  # a FIFO would block the command: refused unopened
                text = f.read(MAX_YAML_BYTES + 1)
            if len(text) > MAX_YAML_BYTES:
                raise ConfigError(f"larger than {MAX_YAML_BYTES // 2**20} MiB; a config is a few KB")
            raw = _Loader(text).get_single_data()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.reader.ReaderError as e:  # a NUL byte, bytes that are not UTF-8
            before = text.decode("utf-8", "replace")[:e.position].encode() if e.encoding == "unicode" else text[:e.position]
            line = before.count(b"\n") + 1
            raise ConfigError(f"{path}: line {line}: {first_line(e)}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            what = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or first_line(e)
            raise ConfigError(f"{path}:{where} YAML syntax error: {clip(what, 200)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: <top level>: must be a mapping of sections, got {_kind(raw)} "
                              "(a run with every default is written {})")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "StackWiseConfig":
        return _build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML that from_yaml reads back (a run's and a sweep's config.yaml)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- derived values: one place that resolves the "None means ..." defaults ----
    @property
    def progressive(self) -> ProgressiveConfig:
        return self.training.progressive

    @property
    def target_stacks(self) -> int:
        p = self.training.progressive
        return p.target_stacks if p.target_stacks is not None else p.max_stacks

    @property
    def blocks_per_stack(self) -> int | list:
        """Blocks in each stack: one number, or a list with one count per stack."""
        p = self.training.progressive
        return p.blocks_per_stack if p.blocks_per_stack is not None else self.model.blocks_per_stack

    def stack_blocks(self, stack_idx: int) -> int:
        """Blocks of stack `stack_idx` (a list's entry, or the one number)."""
        blocks = self.blocks_per_stack
        return blocks[stack_idx] if isinstance(blocks, list) else blocks

    @property
    def causal(self) -> bool:
        if self.model.attention == "auto":
            return self.training.progressive.training_objective == "clm"
        return self.model.attention == "causal"

    def validate(self) -> "StackWiseConfig":
        """Raise ConfigError naming the first bad key: the schema only (types, ranges,
        combinations). Nothing here reads a file, imports code or asks the machine; what a
        run needs from this machine and the outside world is preflight.py's, which the
        commands run before Ray starts (cli.preflight).

        Returns a validated copy, its spellings normalised (stack indices as ints, the
        `stack_time_mapping: module:function` shorthand as custom); `self` is left as it
        is. Validating that copy again, unchanged, returns it at once."""
        if getattr(self, "_validated", None) == repr(self):
            return self
        out = copy.deepcopy(self)
        out._check()
        out._validated = repr(out)  # not a field: to_dict and == ignore it
        return out

    def _check(self) -> None:
        """validate()'s checks, normalising `self` (a fresh copy) as they go."""
        # attribute assignment bypasses from_dict, so types are checked again here
        _check_types(self, "")
        m, d, t, p = self.model, self.data, self.training, self.training.progressive
        _positive(m, "model", "d_model", "n_heads", "max_seq_len")
        _positive(d, "data", "seq_len", "batch_size")
        _positive(t, "training", "eval_batches", "log_every")
        _positive(p, "training.progressive", "qlora_rank", "qlora_alpha", "progressive_qlora_rank",
                  "progressive_qlora_alpha", "max_stacks", "time_embedding_dim", "num_time_steps")
        for sec, obj, keys in (("model", m, ("vocab_size", "n_kv_heads", "d_ff")),
                               ("data", d, ("max_examples",)),
                               ("training", t, ("epochs_per_stack",)),
                               ("training.progressive", p, ("target_stacks",))):
            for k in keys:
                if getattr(obj, k) is not None:
                    _positive(obj, sec, k)
        _positive(self.ray, "ray", "num_workers", "cpus_per_worker")
        _positive(m, "model", "rope_theta", "norm_eps", "init_std")
        for sec, obj, key in (("training", t, "weight_decay"), ("training", t, "grad_clip")):
            if getattr(obj, key) < 0:
                fail(f"{sec}.{key}", f"must be >= 0, got {show(getattr(obj, key))}")
        _within(t, "training", "seed", 0, MAX_SEED)
        _within(d, "data", "split_seed", 0, MAX_SEED)
        _within(p, "training.progressive", "max_stacks", 1, MAX_STACKS)
        _within(self.ray, "ray", "cache_shard_mb", 1, 16_384)
        if m.vocab_size is not None and d.tokenizer == "byte" and m.vocab_size < BYTE_VOCAB_SIZE:
            fail("model.vocab_size", f"must be >= the byte tokenizer's {BYTE_VOCAB_SIZE} ids, got {show(m.vocab_size)}")
        if self.ray.max_failures < 0:
            fail("ray.max_failures", f"must be >= 0, got {show(self.ray.max_failures)}")
        for key in ("checkpoint_every", "eval_every"):
            if getattr(t, key) < 0:
                fail(f"training.{key}", f"must be >= 0, got {show(getattr(t, key))}")
        if self.ray.cache_max_bytes is not None and self.ray.cache_max_bytes < 0:
            fail("ray.cache_max_bytes", f"must be >= 0, got {show(self.ray.cache_max_bytes)}")
        fault = self.ray.inject_worker_failure
        if fault is not None and not (fault.count(":") == 1 and all(x.isdigit() for x in fault.split(":"))):
            fail("ray.inject_worker_failure", f"must look like 'stack:step', got {show(fault)}")
        if d.batch_size % self.ray.num_workers:
            fail("data.batch_size", f"the global batch must split evenly over ray.num_workers={self.ray.num_workers}, got {show(d.batch_size)}")
        if p.time_per_stack < 0:
            fail("training.progressive.time_per_stack", f"must be >= 0, got {show(p.time_per_stack)}")
        if t.lr <= 0:
            fail("training.lr", f"must be > 0, got {show(t.lr)}")
        if t.min_lr < 0 or t.min_lr > t.lr:
            fail("training.min_lr", f"must be in [0, training.lr={t.lr}], got {show(t.min_lr)}")
        if t.warmup_steps < 0:
            fail("training.warmup_steps", f"must be >= 0, got {show(t.warmup_steps)}")
        if not 0 < t.decay_fraction <= 1:
            fail("training.decay_fraction", f"must be in (0, 1], got {show(t.decay_fraction)}")
        if m.d_model % m.n_heads:
            fail("model.d_model", f"must be divisible by model.n_heads={m.n_heads}, got {show(m.d_model)}")
        if (m.d_model // m.n_heads) % 2:
            fail("model.d_model", f"head size d_model/n_heads must be even for rotary embeddings, got {m.d_model // m.n_heads}")
        if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
            fail("model.n_kv_heads", f"must divide model.n_heads={m.n_heads}, got {show(m.n_kv_heads)}")
        if d.seq_len > m.max_seq_len:
            fail("data.seq_len", f"must be <= model.max_seq_len={m.max_seq_len}, got {show(d.seq_len)}")
        if not 0 < d.val_fraction < 1:
            fail("data.val_fraction", f"must be between 0 and 1, got {show(d.val_fraction)}")
        for k in ("min_mask_rate", "max_mask_rate", "mask_token_fraction", "random_token_fraction"):
            if not 0 <= getattr(p, k) <= 1:
                fail(f"training.progressive.{k}", f"must be in [0, 1], got {getattr(p, k)}")
        if p.min_mask_rate > p.max_mask_rate:
            fail("training.progressive.min_mask_rate", f"must be <= max_mask_rate={p.max_mask_rate}, got {show(p.min_mask_rate)}")
        if p.mask_token_fraction + p.random_token_fraction > 1:
            fail("training.progressive.random_token_fraction", "mask_token_fraction + random_token_fraction must be <= 1")
        if not 0 <= p.qlora_dropout < 1:
            fail("training.progressive.qlora_dropout", f"must be in [0, 1), got {show(p.qlora_dropout)}")
        if self.target_stacks > p.max_stacks:
            fail("training.progressive.target_stacks", f"must be <= max_stacks={p.max_stacks}, got {show(p.target_stacks)}")
        for key, value in (("model.blocks_per_stack", m.blocks_per_stack), ("training.steps_per_stack", t.steps_per_stack),
                           ("training.progressive.blocks_per_stack", p.blocks_per_stack)):
            _per_stack_counts(key, value, self.target_stacks)
        if self.causal and p.training_objective == "mlm":
            fail("model.attention", "causal attention cannot see the masked tokens' right context; use bidirectional or auto for mlm")
        if not self.causal and p.training_objective == "clm":
            fail("model.attention", "clm with bidirectional attention lets each position see its own target; use causal or auto")
        if p.training_objective == "custom" and d.source == "pydoc":
            fail("training.progressive.training_objective", "custom needs targets in the data: set data.source to a JSONL/Parquet file and data.target_field")
        if p.training_objective == "custom" and d.target_field is None:
            fail("data.target_field", "training_objective custom needs targets from the data: name their field here")
        self._validate_precisions()
        self._validate_lora()
        self._validate_growth()
        self._validate_time()
        self._validate_tune()
        self._validate_tracking()

    def stack_precision(self, stack_idx: int) -> str:
        p = self.training.progressive
        return p.stack_precisions.get(stack_idx, p.new_stack_precision)

    def _validate_precisions(self) -> None:
        p = self.training.progressive
        p.stack_precisions = _int_keys(p.stack_precisions, "training.progressive.stack_precisions", p.max_stacks)
        for k, v in p.stack_precisions.items():
            if v not in PRECISIONS:
                fail(f"training.progressive.stack_precisions.{k}", _choice_msg(v, PRECISIONS))
        for k in range(self.target_stacks):
            if self.stack_precision(k) in QUANTIZED_PRECISIONS and not p.qlora_enabled:
                key = f"training.progressive.stack_precisions.{k}" if k in p.stack_precisions else "training.progressive.new_stack_precision"
                fail(key, f"a {self.stack_precision(k)} stack has frozen 4-bit base weights and trains only through its LoRA adapter: set training.progressive.qlora_enabled: true")

    def _validate_lora(self) -> None:
        p = self.training.progressive
        if p.trunk_strategy == "qlora" and not (p.qlora_enabled or p.progressive_qlora):
            fail("training.progressive.trunk_strategy", "qlora trains only the trunk's LoRA adapters: set qlora_enabled or progressive_qlora to true")
        p.qlora_configs = _int_keys(p.qlora_configs, "training.progressive.qlora_configs", p.max_stacks)
        for k, v in p.qlora_configs.items():
            key = f"training.progressive.qlora_configs.{k}"
            if not isinstance(v, dict):
                fail(key, f"must be a mapping with rank and alpha, got {show(v)}")
            unknown = set(v) - {"rank", "alpha"}
            if unknown:
                fail(f"{key}.{sorted(unknown)[0]}", "unknown key (expected rank, alpha)")
            for sub in ("rank", "alpha"):
                if sub not in v:
                    fail(f"{key}.{sub}", "missing")
                if isinstance(v[sub], bool) or not isinstance(v[sub], (int, float)) or v[sub] <= 0 or (sub == "rank" and not isinstance(v[sub], int)):
                    fail(f"{key}.{sub}", f"must be a positive {'integer' if sub == 'rank' else 'number'}, got {show(v[sub])}")
        if p.qlora_enabled and p.qlora_strategy == "variable":
            missing = [k for k in range(self.target_stacks) if k not in p.qlora_configs]
            if missing:
                fail("training.progressive.qlora_configs", f"qlora_strategy variable needs an entry for every stack that will be built (0..{self.target_stacks - 1}); missing {missing}")

    def _validate_growth(self) -> None:
        p = self.training.progressive
        if not p.enabled:
            fail("training.progressive.enabled", "must be true: every run here grows the rack stack by stack "
                 "(the same rack trained end to end is tune.baseline: end_to_end)")
        if p.trunk_strategy == "full" and p.progressive_qlora:
            fail("training.progressive.progressive_qlora", "trunk_strategy full trains the trunk's own weights, so a trunk adapter would only be a redundant low-rank copy of their update: set it to false, or use trunk_strategy qlora")
        if p.new_stack_init in ("copy_trunk", "copy_middle", "identity"):
            self._validate_operator()
            return
        if p.new_stack_init != "copy":
            return
        for k in range(1, self.target_stacks):
            source, new = self.stack_precision(k - 1), self.stack_precision(k)
            if self.stack_blocks(k) % self.stack_blocks(k - 1):
                fail("training.progressive.new_stack_init", f"copy fills stack {k}'s {self.stack_blocks(k)} blocks with "
                     f"copies of stack {k - 1}'s {self.stack_blocks(k - 1)}: make it a multiple (model.blocks_per_stack)")
            if not can_copy_weights(source, new):
                fail("training.progressive.new_stack_init", f"copy gives stack {k} ({new}) the weights of stack {k - 1} ({source}); a 4-bit stack copies only from a stack of its own precision")
            if p.qlora_enabled and stack_lora_params(k, p) != stack_lora_params(k - 1, p):
                fail("training.progressive.new_stack_init", f"copy gives stack {k} the LoRA adapter of stack {k - 1}, but qlora_strategy {p.qlora_strategy} gives them different (rank, alpha): {stack_lora_params(k - 1, p)} and {stack_lora_params(k, p)}")

    def _validate_operator(self) -> None:
        """copy_trunk, copy_middle and identity: where they cannot give stack k what they say."""
        p, key = self.training.progressive, "training.progressive.new_stack_init"
        op = p.new_stack_init
        for k in range(1, self.target_stacks):
            new, blocks = self.stack_precision(k), self.stack_blocks(k)
            trunk_blocks = sum(self.stack_blocks(j) for j in range(k))
            if op == "identity":
                if new != "full":
                    fail(key, f"identity needs full-precision new stacks: stack {k} is {new}, which rounds the residual "
                              "stream it passes on (or holds 4-bit weights that cannot start at an exact zero)")
                continue
            for j in range(k):
                source = self.stack_precision(j)
                if not can_copy_weights(source, new):
                    fail(key, f"{op} gives stack {k} ({new}) blocks of stack {j} ({source}); a 4-bit stack copies only "
                              "from a stack of its own precision")
                if p.qlora_enabled and stack_lora_params(k, p) != stack_lora_params(j, p):
                    fail(key, f"{op} gives stack {k} the LoRA adapters of stack {j}'s blocks, but qlora_strategy "
                              f"{p.qlora_strategy} gives them different (rank, alpha): {stack_lora_params(j, p)} and "
                              f"{stack_lora_params(k, p)}")
            if op == "copy_trunk" and blocks % trunk_blocks:
                fail(key, f"copy_trunk fills stack {k}'s {blocks} blocks with copies of the trunk's {trunk_blocks}: "
                          "make each stack's blocks a multiple of the blocks before it (model.blocks_per_stack as a "
                          "list, e.g. [2, 2, 4] or [6, 18])")
            if op == "copy_middle" and blocks > trunk_blocks:
                fail(key, f"copy_middle gives stack {k} the middle {blocks} of the trunk's {trunk_blocks} blocks: "
                          "a stack may hold at most as many blocks as the stacks before it (model.blocks_per_stack)")

    def _validate_time(self) -> None:
        p = self.training.progressive
        p.stack_time_mapping, p.custom_time_mapping = resolve_mapping(p.stack_time_mapping, p.custom_time_mapping)
        if p.stack_time_mapping not in MAPPINGS:
            fail("training.progressive.stack_time_mapping", _choice_msg(p.stack_time_mapping, MAPPINGS))
        if p.stack_time_mapping == "custom":
            if p.custom_time_mapping is None:
                fail("training.progressive.custom_time_mapping", "stack_time_mapping custom needs 'module:function' here")
            check_mapping_name(p.custom_time_mapping)

    def _validate_tracking(self) -> None:
        t = self.tracking
        if t.mlflow is not None and t.mlflow != "local" and "://" not in t.mlflow and t.mlflow != "databricks":
            fail("tracking.mlflow", f"must be local or a tracking URI (http://..., sqlite:///..., databricks), got {show(t.mlflow)}")

    def _validate_protocol(self) -> None:
        """tune.lrs, seeds and baseline_match: the comparison protocol."""
        t = self.tune
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)  # noqa: E731
        _validate_protocol_list(t, "lrs", "training.lr", lambda v: number(v) and v > 0, "a number > 0")
        _validate_protocol_list(t, "seeds", "training.seed",
                                lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
                                f"an integer in [0, {MAX_SEED}]")
        if t.baseline_match != "flops" and t.baseline != "end_to_end":
            fail("tune.baseline_match", "matches the end-to-end baseline: set tune.baseline: end_to_end")

    def _validate_tune(self) -> None:
        t = self.tune
        _positive(t, "tune", "num_samples", "max_concurrent_trials", "grace_period")
        if t.reduction_factor <= 1:
            fail("tune.reduction_factor", f"must be > 1, got {show(t.reduction_factor)}")
        if t.searcher != "none" and (t.baseline != "none" or any("grid" in s for s in t.search_space.values() if isinstance(s, dict))):
            fail("tune.searcher", "a searcher picks its own points: use choice instead of grid, and baseline: none")
        self._validate_protocol()
        lists = [v for s in t.search_space.values() if isinstance(s, dict) for v in s.values() if isinstance(v, list)]
        if sum(map(len, lists)) > MAX_GRID_POINTS:
            fail("tune.search_space", f"lists {sum(map(len, lists)):,} grid and choice values; at most {MAX_GRID_POINTS:,}")
        points = math.prod(len(s["grid"]) for s in t.search_space.values() if isinstance(s, dict) and isinstance(s.get("grid"), list))
        points *= max(1, len(t.lrs)) * max(1, len(t.seeds))
        if points > MAX_GRID_POINTS:
            fail("tune.search_space", f"the grid has {points:,} points; at most {MAX_GRID_POINTS:,} trials")
        _check_trial_count(t.num_samples, points)
        _check_repeats_measure_something(t)
        _check_protocol_overrides(t)
        for path, spec in t.search_space.items():
            key = f"tune.search_space.{path}"
            field_type = _field_type(self, str(path), key)
            _check_sweepable(str(path), key)
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                fail(key, f"must be a mapping with one of {', '.join(SEARCH_KINDS)}, got {show(spec)}")
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice"):
                if not isinstance(values, list) or not values:
                    fail(f"{key}.{kind}", f"must be a non-empty list, got {show(values)}")
                for value in values:  # every value must make a valid config
                    try:
                        apply_overrides(self, {path: value}).validate()
                    except ConfigError as e:
                        fail(f"{key}.{kind}", f"value {show(value)}: {e}")
                _refuse_duplicates(f"{key}.{kind}", values, field_type)
            else:
                if (not isinstance(values, list) or len(values) != 2
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in values)
                        or values[0] >= values[1]):
                    fail(f"{key}.{kind}", f"must be [low, high] with low < high, got {show(values)}")
                if kind == "loguniform" and values[0] <= 0:
                    fail(f"{key}.{kind}", "bounds must be > 0")
                if field_type not in (int, float) or (kind == "randint" and field_type is not int):
                    fail(key, f"{kind} needs a numeric key, {path} is not")
                if field_type is int and kind != "randint":
                    fail(key, f"{kind} draws fractions; {path} is an integer: use randint")
                for bound in values:  # the key's rules are ranges, so both bounds decide
                    try:
                        apply_overrides(self, {path: bound}).validate()
                    except ConfigError as e:
                        fail(f"{key}.{kind}", f"bound {show(bound)}: {e}")


def _check_trial_count(num_samples: int, points: int) -> None:
    if num_samples * points > MAX_TRIALS:
        fail("tune.num_samples", f"{num_samples:,} x {points:,} grid points = {num_samples * points:,} trials; "
                                 f"at most {MAX_TRIALS:,}")


def _check_repeats_measure_something(t) -> None:
    """num_samples repeats a sweep; where nothing is drawn (every swept key is a grid, or
    none), each repeat is the same deterministic trial: one measurement counted twice."""
    if t.num_samples > 1 and not any(isinstance(s, dict) and "grid" not in s for s in t.search_space.values()):
        fail("tune.num_samples", f"{t.num_samples} repeats of a sweep that draws nothing (no choice, uniform, "
                                 "loguniform or randint key) would run every trial again with the same seed: set "
                                 "num_samples: 1 (tune.seeds repeats with new seeds)")


def _check_protocol_overrides(t) -> None:
    """tune.lrs sets training.min_lr of each trial (its ratio to lr is kept): a swept
    min_lr would be overridden, and the table would show values that never ran."""
    if t.lrs and "training.min_lr" in t.search_space:
        fail("tune.lrs", "sets each trial's training.min_lr (keeping the base min_lr/lr ratio), so "
                         "tune.search_space.training.min_lr would never run as swept: sweep one of them")


def _check_sweepable(path: str, key: str) -> None:
    if path in UNSWEPT_KEYS:
        fail(key, f"cannot differ between the trials of one sweep (they share one experiment directory and one Ray): "
                  f"set it in the ray section or with {UNSWEPT_KEYS[path]}")


def _refuse_duplicates(key: str, values: list, field_type) -> None:
    """A grid or choice value listed twice, compared as the trials see it (1e-3 and 0.001
    are one value; an int given for a float key is that float)."""
    typed = [float(v) if field_type is float and isinstance(v, int) and not isinstance(v, bool) else v for v in values]
    for i, v in enumerate(typed):
        if any(type(v) is type(w) and v == w for w in typed[:i]):
            fail(key, f"lists the value {show(v)} twice; each value is one arm of the comparison")


def _validate_protocol_list(t, key: str, path: str, ok, what: str) -> None:
    values = getattr(t, key)
    for i, v in enumerate(values):
        if not ok(v):
            fail(f"tune.{key}.{i}", f"must be {what}, got {show(v)}")
    if len(set(values)) != len(values):
        fail(f"tune.{key}", f"lists a value twice: {show(values)}")
    if values and path in t.search_space:
        fail(f"tune.{key}", f"{path} is in tune.search_space too; set it in one place")
    if values and t.searcher != "none":
        fail(f"tune.{key}", "a searcher picks its own points; tune.lrs and tune.seeds need searcher: none")


def _field_type(config, path: str, key: str, allow_tune: bool = False):
    """The declared type of the config key at `path` (a.b.c), or a ConfigError naming `key`
    (a sweep cannot sweep its own tune section; an override can set it)."""
    obj, parts = config, path.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if part not in names or (i == 0 and part == "tune" and not allow_tune):
            near = difflib.get_close_matches(part, names, n=1)
            fail(key, f"no such config key{f' (did you mean {show(near[0])}?)' if near else ''}")
        tp = _hints(type(obj))[part]
        obj = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                fail(key, "is a whole section; name one of its keys")
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return args[0] if typing.get_origin(tp) in (Union, types.UnionType) else tp


def apply_overrides(config: StackWiseConfig, overrides: dict) -> StackWiseConfig:
    """A copy of `config` with `{key path: value}` set, as one trial sees it: without the
    tune section (not validated)."""
    raw = config.to_dict()
    raw.pop("tune")
    out = StackWiseConfig.from_dict(raw)
    for path, value in overrides.items():
        *parents, last = str(path).split(".")
        obj = out
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, last, float(value) if isinstance(getattr(obj, last), float) and isinstance(value, int) else value)
    return out


def apply_cli_overrides(config: StackWiseConfig, overrides: list[str]) -> StackWiseConfig:
    """`key.path=value` overrides from a command line (nanoGPT's configurator, Hydra),
    applied to `config` in place and returned. A value is typed by its field: numbers,
    true/false, null for an optional key, a string as written, YAML for a mapping or
    list. An unknown key or a bad value raises ConfigError naming the override."""
    for text in overrides:
        where = f"override {clip(text, 120)!r}"
        path, sep, raw = text.partition("=")
        if not sep or not path:
            fail(where, "must be key.path=value, e.g. training.lr=1e-3")
        try:
            _field_type(config, path, path, allow_tune=True)  # an unknown key, or a whole section
        except ConfigError as e:
            fail(where, str(e))
        *parents, last = path.split(".")
        obj = config
        for part in parents:
            obj = getattr(obj, part)
        tp = _hints(type(obj))[last]
        try:
            value = _parse_override(tp, raw, path)
            _check_value(tp, value, path)
        except ConfigError as e:
            fail(where, str(e))
        setattr(obj, last, value)
    return config


def _parse_override(tp, raw: str, path: str):
    """The value a command-line string means for a field of type `tp`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        if raw.strip().lower() in ("null", "none", "~", ""):
            return None
        if list in args and raw.strip().startswith("["):
            return _parse_override(list, raw, path)
        return _parse_override(next(a for a in args if a is not type(None)), raw, path)
    if typing.get_origin(tp) is Literal or tp is str:
        return raw
    if tp is bool:
        words = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
        if raw.strip().lower() not in words:
            fail(path, f"must be true or false, got {show(raw)}")
        return words[raw.strip().lower()]
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            fail(path, f"must be {_type_name(tp)}, got {show(raw)}")
    try:  # a mapping or a list, as YAML
        return _Loader(raw.encode()).get_single_data()
    except yaml.YAMLError as e:
        fail(path, f"YAML syntax error: {first_line(e)}")


def load_config(path: str | os.PathLike) -> StackWiseConfig:
    """Read and validate a YAML file; every error message starts with the file's path."""
    path = os.fspath(path)
    try:
        return StackWiseConfig.from_yaml(path).validate()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from None


# ---------------------------------------------------------------- reading YAML

MAX_YAML_BYTES = 16 * 2**20
MAX_YAML_NODES = 100_000  # values a document expands to, aliases counted in full (a real config has hundreds)
MAX_YAML_DEPTH = 64  # a config nests 6 levels deep


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses, before building anything, what no config needs and a
    hostile file can use: aliases that expand past MAX_YAML_NODES values (nested aliases
    grow exponentially, and error messages, deep copies and grid checks expand them),
    nesting past MAX_YAML_DEPTH (the composer recurses), and duplicate keys (the last
    would win silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._expanded = 0
        self._sizes = {}  # node -> values it expands to; absent while it is being composed
        self._depth = 0

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self._sizes:
                raise ConfigError(f"line {line}: alias refers to a value that contains it")
            self._count(self._sizes[node], line)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise ConfigError(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels")
        before = self._expanded
        self._count(1, line)
        node = super().compose_node(parent, index)
        self._sizes[node] = self._expanded - before
        self._depth -= 1
        return node

    def _count(self, n: int, line: int) -> None:
        self._expanded += n
        if self._expanded > MAX_YAML_NODES:
            raise ConfigError(f"line {line}: aliases expand the document past {MAX_YAML_NODES:,} values")

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = first.setdefault((key.tag, key.value), key.start_mark.line + 1)
                if line != key.start_mark.line + 1:
                    raise ConfigError(f"line {key.start_mark.line + 1}: duplicate key {clip(key.value)!r} "
                                      f"(first on line {line})")
        return node

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # past Python's 4300-digit limit
            raise ConfigError(f"line {node.start_mark.line + 1}: an integer of {len(node.value):,} digits") from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


# ---------------------------------------------------------------- building from dicts

@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # evaluates every annotation's string: slow, and grid checks validate often


def _build(cls, raw: Any, path: str):
    if not isinstance(raw, dict):
        fail(path or "<top level>", f"must be a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known keys: {', '.join(names)})"
            fail(full, f"unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp, value, path):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path)
    _check_value(tp, value, path)
    return float(value) if tp is float and isinstance(value, int) else value


def _check_value(tp, value, path):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if list in options and isinstance(value, list):  # a count per stack, or one for all
            return
        return _check_value(options[0], value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail(path, _choice_msg(value, typing.get_args(tp)))
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, list),
    }[tp](value)
    if not ok:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        name = "a finite number" if tp is float and number else _type_name(tp)
        fail(path, f"must be {name}, got {type(value).__name__} {show(value)}")


def _check_types(obj, path):
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        full = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _check_types(value, full)
        else:
            _check_value(hints[f.name], value, full)
            if isinstance(value, int) and not isinstance(value, bool) and float in typing.get_args(hints[f.name]) + (hints[f.name],):
                setattr(obj, f.name, float(value))  # 32 and 32.0 are one setting (and hash alike)


def _type_name(tp):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list"}[tp]


def _choice_msg(value, choices):
    near = difflib.get_close_matches(clip(value, 200) if isinstance(value, str) else show(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"must be one of {', '.join(map(str, choices))}; got {show(value)}{hint}"


def _positive(obj, section, *keys):
    for k in keys:
        v = getattr(obj, k)
        if v <= 0:
            fail(f"{section}.{k}", f"must be > 0, got {show(v)}")


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past float's range
        return False


def _within(obj, section, key, low, high):
    v = getattr(obj, key)
    if not low <= v <= high:
        fail(f"{section}.{key}", f"must be in [{low}, {high:,}], got {show(v)}")


def _int_keys(d: dict, path: str, max_stacks: int) -> dict:
    out = {}
    for k, v in d.items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError, OverflowError):
            fail(f"{path}.{k}", "keys must be stack indices (integers)")
        if not 0 <= int(k) < max_stacks:
            fail(f"{path}.{k}", f"no such stack: indices run from 0 to max_stacks-1={max_stacks - 1}")
    return out


def _per_stack_counts(key: str, value, stacks: int) -> None:
    """A count per stack: a positive integer, or a list of them with an entry for each of
    the run's `stacks` stacks (None: not set)."""
    if value is None:
        return
    if not isinstance(value, list):
        if value <= 0:
            fail(key, f"must be > 0, got {show(value)}")
        return
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            fail(f"{key}.{i}", f"must be a positive integer, got {show(v)}")
    if len(value) < stacks:
        fail(key, f"lists {len(value)} counts, one per stack, but the run trains {stacks} stacks "
                  "(training.progressive.target_stacks, else max_stacks)")


def _kind(value) -> str:
    return "an empty document" if value is None else f"{type(value).__name__} {show(value)}"
