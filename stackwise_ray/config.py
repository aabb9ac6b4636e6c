"""StackWiseConfig: typed sections loaded from YAML, with errors that name the key path.

Every section is a plain dataclass, so `config.training.progressive.qlora_rank = 8`
works as the source document shows. `validate()` checks types, ranges and the
combinations that cannot work, and raises `ConfigError` with the full key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

PRECISIONS = ("full", "half", "bfloat16", "nvfp4", "qlora")
QUANTIZED_PRECISIONS = ("nvfp4", "qlora")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key path."""


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (no grouped KV)
    d_ff: Optional[int] = None  # None: SwiGLU's usual 8/3 * d_model, rounded up to 32
    blocks_per_stack: int = 2
    max_seq_len: int = 128
    attention: Literal["auto", "bidirectional", "causal"] = "auto"  # auto: causal for clm
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class DataConfig:
    source: str = "pydoc"  # "pydoc" (ships with Python) or a .txt/.jsonl/.parquet path
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    target_field: Optional[str] = None  # for training_objective: custom
    tokenizer: str = "byte"  # "byte" or a tokenizers JSON file
    seq_len: int = 128
    val_fraction: float = 0.1
    batch_size: int = 16
    max_examples: Optional[int] = None
    split_seed: int = 0  # the split stays fixed when the training seed changes


@dataclass
class ProgressiveConfig:
    enabled: bool = True
    trunk_strategy: Literal["frozen", "qlora"] = "frozen"
    new_stack_precision: Literal["full", "half", "bfloat16", "nvfp4", "qlora"] = "full"
    cache_activations: bool = True
    # stack LoRA: one adapter per stack, added when the stack is created
    qlora_enabled: bool = False
    qlora_rank: int = 16
    qlora_alpha: float = 32
    qlora_dropout: float = 0.0
    qlora_strategy: Literal["simplified", "progressive", "variable"] = "simplified"
    qlora_rank_pattern: Literal["increasing", "decreasing", "linear", "constant"] = "constant"
    qlora_alpha_pattern: Literal["increasing", "decreasing", "linear", "constant"] = "constant"
    qlora_configs: dict = field(default_factory=dict)  # {stack_idx: {rank, alpha}}
    # progressive (trunk) QLoRA: a second adapter on every trunk stack
    progressive_qlora: bool = False
    progressive_qlora_rank: int = 8
    progressive_qlora_alpha: float = 16
    max_stacks: int = 12
    target_stacks: Optional[int] = None  # None: max_stacks
    blocks_per_stack: Optional[int] = None  # None: model.blocks_per_stack
    stack_precisions: dict = field(default_factory=dict)  # {stack_idx: precision}
    building_mode: Literal["append", "prepend"] = "append"
    # time
    time_interpretation: Literal["input", "depth"] = "depth"
    time_embedding_dim: int = 512
    time_encoding_type: Literal["sinusoidal", "learned"] = "sinusoidal"
    stack_time_mapping: str = "linear"  # linear | exponential | custom | module:function
    custom_time_mapping: Optional[str] = None  # module:function for stack_time_mapping: custom
    time_per_stack: int = 100
    num_time_steps: int = 1000
    # objective and corruption
    training_objective: Literal["mlm", "clm", "custom"] = "mlm"
    min_mask_rate: float = 0.15  # mask rate at time step 0
    max_mask_rate: float = 0.9  # mask rate at the last time step
    mask_token_fraction: float = 0.8  # of corrupted positions: mask token
    random_token_fraction: float = 0.1  # random token; the rest keep their token


@dataclass
class TrainingConfig:
    seed: int = 0
    steps_per_stack: int = 200
    epochs_per_stack: Optional[int] = None  # if set, overrides steps_per_stack
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100  # in-phase checkpoint every N steps (0: only at the end), for worker restarts
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class RayConfig:
    num_workers: int = 1  # Ray Train workers per phase (DDP across them)
    use_gpu: bool = False
    cpus_per_worker: float = 1
    cache_backend: Literal["object_store", "arrow"] = "object_store"
    storage_path: str = "runs"  # relative paths are made absolute against the working directory
    address: Optional[str] = None  # None: RAY_ADDRESS or a local Ray
    max_failures: int = 2  # worker failures a phase survives (it restarts from its last in-phase checkpoint)
    cache_max_bytes: Optional[int] = None  # None: half the object store, or half the free disk for arrow
    inject_worker_failure: Optional[str] = None  # testing aid: "stack:step" makes a worker exit once there


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class TuneConfig:
    search_space: dict = field(default_factory=dict)  # {key path: {grid|choice|uniform|loguniform|randint: ...}}
    num_samples: int = 1
    metric: Literal["val_loss", "val_ppl", "val_accuracy"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int = 2
    scheduler: Literal["none", "asha", "median"] = "none"
    grace_period: int = 1  # stacks a trial trains before the scheduler may stop it
    reduction_factor: float = 2
    searcher: Literal["none", "optuna"] = "none"
    baseline: Literal["none", "end_to_end"] = "none"
    share_phases: bool = True  # trials reuse each other's finished phases (false: every trial trains its own)


@dataclass
class StackWiseConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "StackWiseConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} YAML syntax error: {getattr(e, 'problem', e)}") from None
        return cls.from_dict(raw or {})

    @classmethod
    def from_dict(cls, raw: Any) -> "StackWiseConfig":
        return _build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- derived values: one place that resolves the "None means ..." defaults ----
    @property
    def progressive(self) -> ProgressiveConfig:
        return self.training.progressive

    @property
    def target_stacks(self) -> int:
        p = self.training.progressive
        return p.target_stacks if p.target_stacks is not None else p.max_stacks

    @property
    def blocks_per_stack(self) -> int:
        p = self.training.progressive
        return p.blocks_per_stack if p.blocks_per_stack is not None else self.model.blocks_per_stack

    @property
    def causal(self) -> bool:
        if self.model.attention == "auto":
            return self.training.progressive.training_objective == "clm"
        return self.model.attention == "causal"

    def validate(self, check_files: bool = True, import_code: bool = True) -> "StackWiseConfig":
        """Raise ConfigError naming the first bad key. check_files=False skips the data and
        tokenizer file checks (loading a trained rack elsewhere needs neither).
        import_code=False checks a custom time mapping's 'module:function' shape without
        importing it (a rack's stored config: its time steps are stored as data)."""
        # attribute assignment bypasses from_dict, so types are checked again here
        _check_types(self, "")
        m, d, t, p = self.model, self.data, self.training, self.training.progressive
        _positive(m, "model", "d_model", "n_heads", "blocks_per_stack", "max_seq_len")
        _positive(d, "data", "seq_len", "batch_size")
        _positive(t, "training", "steps_per_stack", "eval_batches", "log_every")
        _positive(p, "training.progressive", "qlora_rank", "qlora_alpha", "progressive_qlora_rank",
                  "progressive_qlora_alpha", "max_stacks", "time_embedding_dim", "num_time_steps")
        for sec, obj, keys in (("model", m, ("vocab_size", "n_kv_heads", "d_ff")),
                               ("data", d, ("max_examples",)),
                               ("training", t, ("epochs_per_stack",)),
                               ("training.progressive", p, ("target_stacks", "blocks_per_stack"))):
            for k in keys:
                if getattr(obj, k) is not None:
                    _positive(obj, sec, k)
        _positive(self.ray, "ray", "num_workers", "cpus_per_worker")
        storage_dir(self.ray.storage_path)
        if self.ray.max_failures < 0:
            _fail("ray.max_failures", f"must be >= 0, got {self.ray.max_failures}")
        if t.checkpoint_every < 0:
            _fail("training.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
        if self.ray.cache_max_bytes is not None and self.ray.cache_max_bytes < 0:
            _fail("ray.cache_max_bytes", f"must be >= 0, got {self.ray.cache_max_bytes}")
        fault = self.ray.inject_worker_failure
        if fault is not None and not (fault.count(":") == 1 and all(x.isdigit() for x in fault.split(":"))):
            _fail("ray.inject_worker_failure", f"must look like 'stack:step', got {fault!r}")
        if d.batch_size % self.ray.num_workers:
            _fail("data.batch_size", f"the global batch must split evenly over ray.num_workers={self.ray.num_workers}, got {d.batch_size}")
        if p.time_per_stack < 0:
            _fail("training.progressive.time_per_stack", f"must be >= 0, got {p.time_per_stack}")
        if t.lr <= 0:
            _fail("training.lr", f"must be > 0, got {t.lr}")
        if t.min_lr < 0 or t.min_lr > t.lr:
            _fail("training.min_lr", f"must be in [0, training.lr={t.lr}], got {t.min_lr}")
        if t.warmup_steps < 0:
            _fail("training.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
        if m.d_model % m.n_heads:
            _fail("model.d_model", f"must be divisible by model.n_heads={m.n_heads}, got {m.d_model}")
        if (m.d_model // m.n_heads) % 2:
            _fail("model.d_model", f"head size d_model/n_heads must be even for rotary embeddings, got {m.d_model // m.n_heads}")
        if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
            _fail("model.n_kv_heads", f"must divide model.n_heads={m.n_heads}, got {m.n_kv_heads}")
        if d.seq_len > m.max_seq_len:
            _fail("data.seq_len", f"must be <= model.max_seq_len={m.max_seq_len}, got {d.seq_len}")
        if not 0 < d.val_fraction < 1:
            _fail("data.val_fraction", f"must be between 0 and 1, got {d.val_fraction}")
        for k in ("min_mask_rate", "max_mask_rate", "mask_token_fraction", "random_token_fraction"):
            if not 0 <= getattr(p, k) <= 1:
                _fail(f"training.progressive.{k}", f"must be in [0, 1], got {getattr(p, k)}")
        if p.min_mask_rate > p.max_mask_rate:
            _fail("training.progressive.min_mask_rate", f"must be <= max_mask_rate={p.max_mask_rate}, got {p.min_mask_rate}")
        if p.mask_token_fraction + p.random_token_fraction > 1:
            _fail("training.progressive.random_token_fraction", "mask_token_fraction + random_token_fraction must be <= 1")
        if not 0 <= p.qlora_dropout < 1:
            _fail("training.progressive.qlora_dropout", f"must be in [0, 1), got {p.qlora_dropout}")
        if self.target_stacks > p.max_stacks:
            _fail("training.progressive.target_stacks", f"must be <= max_stacks={p.max_stacks}, got {p.target_stacks}")
        if self.causal and p.training_objective == "mlm":
            _fail("model.attention", "causal attention cannot see the masked tokens' right context; use bidirectional or auto for mlm")
        if not self.causal and p.training_objective == "clm":
            _fail("model.attention", "clm with bidirectional attention lets each position see its own target; use causal or auto")
        if p.training_objective == "custom" and d.source == "pydoc":
            _fail("training.progressive.training_objective", "custom needs targets in the data: set data.source to a JSONL/Parquet file and data.target_field")
        if p.training_objective == "custom" and d.target_field is None:
            _fail("data.target_field", "training_objective custom needs targets from the data: name their field here")
        self._validate_precisions()
        self._validate_lora()
        self._validate_time(import_code)
        self._validate_tune(check_files, import_code)
        if check_files:
            _validate_data_source(d)
        return self

    def stack_precision(self, stack_idx: int) -> str:
        p = self.training.progressive
        return p.stack_precisions.get(stack_idx, p.new_stack_precision)

    def _validate_precisions(self) -> None:
        p = self.training.progressive
        p.stack_precisions = _int_keys(p.stack_precisions, "training.progressive.stack_precisions")
        for k, v in p.stack_precisions.items():
            if v not in PRECISIONS:
                _fail(f"training.progressive.stack_precisions.{k}", _choice_msg(v, PRECISIONS))
        for k in range(self.target_stacks):
            if self.stack_precision(k) in QUANTIZED_PRECISIONS and not p.qlora_enabled:
                key = f"training.progressive.stack_precisions.{k}" if k in p.stack_precisions else "training.progressive.new_stack_precision"
                _fail(key, f"a {self.stack_precision(k)} stack has frozen 4-bit base weights and trains only through its LoRA adapter: set training.progressive.qlora_enabled: true")

    def _validate_lora(self) -> None:
        p = self.training.progressive
        if p.trunk_strategy == "qlora" and not (p.qlora_enabled or p.progressive_qlora):
            _fail("training.progressive.trunk_strategy", "qlora trains only the trunk's LoRA adapters: set qlora_enabled or progressive_qlora to true")
        p.qlora_configs = _int_keys(p.qlora_configs, "training.progressive.qlora_configs")
        for k, v in p.qlora_configs.items():
            key = f"training.progressive.qlora_configs.{k}"
            if not isinstance(v, dict):
                _fail(key, f"must be a mapping with rank and alpha, got {v!r}")
            unknown = set(v) - {"rank", "alpha"}
            if unknown:
                _fail(f"{key}.{sorted(unknown)[0]}", "unknown key (expected rank, alpha)")
            for sub in ("rank", "alpha"):
                if sub not in v:
                    _fail(f"{key}.{sub}", "missing")
                if isinstance(v[sub], bool) or not isinstance(v[sub], (int, float)) or v[sub] <= 0 or (sub == "rank" and not isinstance(v[sub], int)):
                    _fail(f"{key}.{sub}", f"must be a positive {'integer' if sub == 'rank' else 'number'}, got {v[sub]!r}")
        if p.qlora_enabled and p.qlora_strategy == "variable":
            missing = [k for k in range(self.target_stacks) if k not in p.qlora_configs]
            if missing:
                _fail("training.progressive.qlora_configs", f"qlora_strategy variable needs an entry for every stack that will be built (0..{self.target_stacks - 1}); missing {missing}")

    def _validate_time(self, import_code: bool) -> None:
        p = self.training.progressive
        mapping = p.stack_time_mapping
        if ":" in mapping:  # stack_time_mapping: "module:function" is shorthand for custom
            p.custom_time_mapping, p.stack_time_mapping = mapping, "custom"
        elif mapping not in ("linear", "exponential", "custom"):
            _fail("training.progressive.stack_time_mapping", _choice_msg(mapping, ("linear", "exponential", "custom")))
        if p.stack_time_mapping == "custom":
            if p.custom_time_mapping is None:
                _fail("training.progressive.custom_time_mapping", "stack_time_mapping custom needs 'module:function' here")
            if not import_code:  # the shape only: a rack's stored config names code it never runs
                module_name, _, fn_name = p.custom_time_mapping.partition(":")
                if not module_name or not fn_name:
                    _fail("training.progressive.custom_time_mapping", f"must look like 'module:function', got {p.custom_time_mapping!r}")
                return
            fn = load_time_mapping(p.custom_time_mapping, "training.progressive.custom_time_mapping")
            for k in range(self.target_stacks):
                try:
                    step = fn(k, p.max_stacks, p.num_time_steps)
                except Exception as e:
                    _fail("training.progressive.custom_time_mapping", f"{p.custom_time_mapping} raised {type(e).__name__} for stack {k}: {_first_line(e)}")
                if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < p.num_time_steps:
                    _fail("training.progressive.custom_time_mapping", f"{p.custom_time_mapping} returned {step!r} for stack {k}; expected an int in [0, {p.num_time_steps})")


    def _validate_tune(self, check_files: bool, import_code: bool) -> None:
        t = self.tune
        _positive(t, "tune", "num_samples", "max_concurrent_trials", "grace_period")
        if t.reduction_factor <= 1:
            _fail("tune.reduction_factor", f"must be > 1, got {t.reduction_factor}")
        if t.searcher != "none" and (t.baseline != "none" or any("grid" in s for s in t.search_space.values() if isinstance(s, dict))):
            _fail("tune.searcher", "a searcher picks its own points: use choice instead of grid, and baseline: none")
        for path, spec in t.search_space.items():
            key = f"tune.search_space.{path}"
            field_type = _field_type(self, str(path), key)
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                _fail(key, f"must be a mapping with one of {', '.join(SEARCH_KINDS)}, got {spec!r}")
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice"):
                if not isinstance(values, list) or not values:
                    _fail(f"{key}.{kind}", f"must be a non-empty list, got {values!r}")
                for value in values:  # every value must make a valid config
                    try:
                        apply_overrides(self, {path: value}).validate(check_files, import_code)
                    except ConfigError as e:
                        _fail(f"{key}.{kind}", f"value {value!r}: {e}")
            else:
                if (not isinstance(values, list) or len(values) != 2
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                        or values[0] >= values[1]):
                    _fail(f"{key}.{kind}", f"must be [low, high] with low < high, got {values!r}")
                if kind == "loguniform" and values[0] <= 0:
                    _fail(f"{key}.{kind}", "bounds must be > 0")
                if field_type not in (int, float) or (kind == "randint" and field_type is not int):
                    _fail(key, f"{kind} needs a numeric key, {path} is not")


def _field_type(config, path: str, key: str):
    """The declared type of the config key at `path` (a.b.c), or a ConfigError naming `key`."""
    obj, parts = config, path.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if part not in names or (i == 0 and part == "tune"):
            near = difflib.get_close_matches(part, names, n=1)
            _fail(key, f"no such config key{f' (did you mean {near[0]!r}?)' if near else ''}")
        tp = typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                _fail(key, "is a whole section; sweep one of its keys")
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


def storage_dir(path: str) -> str:
    """Where runs go: an absolute local directory (a plain or mounted path, or file://),
    or a URI of a filesystem pyarrow knows (storage.py)."""
    from .storage import SCHEMES

    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        scheme = path.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise ConfigError(f"ray.storage_path: {path!r}: unknown scheme {scheme!r}; use a local or mounted path, "
                              f"file://, or one of {', '.join(s + '://' for s in SCHEMES)}")
        return path.rstrip("/")
    return os.path.abspath(path)


def check_storage(path: str) -> None:
    """Reach a remote storage path once, before anything starts (a typo in a bucket or
    endpoint fails here, in one line)."""
    from . import storage

    location = storage_dir(path)
    if storage.is_remote(location):
        try:
            storage.makedirs(location)
        except (OSError, ValueError) as e:  # pyarrow's errors carry the service's reason
            raise ConfigError(f"ray.storage_path: {location}: cannot be reached: {str(e).splitlines()[0]}") from None


def load_config(path: str | os.PathLike) -> StackWiseConfig:
    """Read and validate a YAML file; every error message starts with the file's path."""
    path = os.fspath(path)
    try:
        return StackWiseConfig.from_yaml(path).validate()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def load_for_command(path: str, storage: str | None, check_data: bool = True,
                     address: str | None = None) -> StackWiseConfig | None:
    """What both commands do first: load and validate the YAML, apply --storage, check
    that a GPU run has a GPU, and load the data (a bad data file fails here, before Ray
    starts). On bad input, print one line naming the file and return None (the command
    exits with status 2)."""
    try:
        config = load_config(path)
        if storage:
            config.ray.storage_path = storage_dir(storage)
        check_storage(config.ray.storage_path)
        if config.ray.use_gpu and not (address or config.ray.address or os.environ.get("RAY_ADDRESS")):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("ray.use_gpu: true, but this machine has no CUDA GPU (set it to false, or give "
                                  "the address of a cluster with GPU workers: ray.address, RAY_ADDRESS or --address)")
        if check_data:
            from .data import build_datasets

            build_datasets(config)
        return config
    except (ConfigError, ValueError) as e:
        print(f"error: {e}" if str(e).startswith(path) else f"error: {path}: {e}", file=sys.stderr)
        return None


def load_time_mapping(spec: str, key: str = "training.progressive.custom_time_mapping"):
    """Import `module:function` with signature f(stack_idx, max_stacks, num_time_steps).

    This import is the only code a configuration can name.
    """
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        _fail(key, f"must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        _fail(key, f"cannot import module {module_name!r}: {e}")
    except Exception as e:  # the module itself is broken (SyntaxError, an error at import time)
        _fail(key, f"cannot import module {module_name!r}: {type(e).__name__}: {_first_line(e)}")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        _fail(key, f"module {module_name!r} has no function {fn_name!r}")
    try:
        inspect.signature(fn).bind(0, 1, 1)
    except TypeError:
        _fail(key, f"{spec} must accept (stack_idx, max_stacks, num_time_steps)")
    except ValueError:
        pass  # builtins without a signature: try them as they are
    return fn


# ---------------------------------------------------------------- building from dicts

def _build(cls, raw: Any, path: str):
    if not isinstance(raw, dict):
        _fail(path or "<top level>", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known keys: {', '.join(names)})"
            _fail(full, f"unknown key{hint}")
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
        return _check_value(next(a for a in args if a is not type(None)), value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(path, _choice_msg(value, typing.get_args(tp)))
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }[tp](value)
    if not ok:
        _fail(path, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_types(obj, path):
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        full = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _check_types(value, full)
        else:
            _check_value(hints[f.name], value, full)


def _type_name(tp):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}[tp]


def _choice_msg(value, choices):
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"must be one of {', '.join(map(str, choices))}; got {value!r}{hint}"


def _positive(obj, section, *keys):
    for k in keys:
        v = getattr(obj, k)
        if v <= 0:
            _fail(f"{section}.{k}", f"must be > 0, got {v}")


def _int_keys(d: dict, path: str) -> dict:
    out = {}
    for k, v in d.items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            _fail(f"{path}.{k}", "keys must be stack indices (integers)")
    return out


def _validate_data_source(d: DataConfig) -> None:
    if d.source != "pydoc" and not os.path.isfile(d.source):
        _fail("data.source", f"no such file: {d.source} (use 'pydoc' for the bundled corpus)")
    if d.tokenizer != "byte" and not os.path.isfile(d.tokenizer):
        _fail("data.tokenizer", f"no such file: {d.tokenizer} (use 'byte' for the built-in byte tokenizer)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _fail(path: str, msg: str):
    raise ConfigError(f"{path}: {msg}")
