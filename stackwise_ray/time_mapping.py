"""Stack index -> depth time step: the built-in mappings, and the import of a custom one.

A custom mapping is a function f(stack_idx, max_stacks, num_time_steps) named in the
config as `module:function`; importing it is the only code a configuration can name.
"""

from __future__ import annotations

import importlib
import inspect

from .errors import clip, fail, first_line, show

MAPPINGS = ("linear", "exponential", "custom")
KEY = "training.progressive.custom_time_mapping"


def resolve_mapping(mapping: str, custom: str | None) -> tuple[str, str | None]:
    """(stack_time_mapping, custom_time_mapping) with the shorthand
    `stack_time_mapping: module:function` spelled out as custom."""
    return ("custom", mapping) if ":" in mapping else (mapping, custom)


def time_step_for_stack(stack_idx: int, mapping: str, time_per_stack: int, max_stacks: int,
                        num_time_steps: int, custom_fn=None) -> int:
    last = num_time_steps - 1
    if mapping == "linear":
        return min(stack_idx * time_per_stack, last)
    if mapping == "exponential":
        return min(time_per_stack * (2 ** stack_idx - 1), last)
    if mapping == "custom":
        if custom_fn is None:
            raise ValueError("stack_time_mapping 'custom' needs custom_fn")
        step = custom_fn(stack_idx, max_stacks, num_time_steps)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_time_steps:
            raise ValueError(f"custom time mapping returned {step!r} for stack {stack_idx}; "
                             f"expected an int in [0, {num_time_steps})")
        return step
    raise ValueError(f"unknown stack_time_mapping {mapping!r} (linear, exponential or custom)")


def depth_time_step(config, stack_idx: int) -> int:
    """The depth time step of stack `stack_idx` under a StackWiseConfig's mapping."""
    p = config.training.progressive
    mapping, custom = resolve_mapping(p.stack_time_mapping, p.custom_time_mapping)
    custom_fn = load_time_mapping(custom) if mapping == "custom" else None
    return time_step_for_stack(stack_idx, mapping, p.time_per_stack, p.max_stacks, p.num_time_steps, custom_fn)


def load_time_mapping(spec: str, key: str = KEY):
    """Import `module:function` with signature f(stack_idx, max_stacks, num_time_steps);
    ConfigError naming `key` if it cannot be imported or called that way."""
    module_name, fn_name = check_mapping_name(spec, key)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        fail(key, f"cannot import module {show(module_name)}: {first_line(e)}")
    except BaseException as e:  # the module itself is broken (SyntaxError, an error or sys.exit at import time)
        fail(key, f"cannot import module {show(module_name)}: {type(e).__name__}: {first_line(e)}")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        fail(key, f"module {show(module_name)} has no function {show(fn_name)}")
    try:
        inspect.signature(fn).bind(0, 1, 1)
    except TypeError:
        fail(key, f"{clip(spec)} must accept (stack_idx, max_stacks, num_time_steps)")
    except ValueError:
        pass  # builtins without a signature: try them as they are
    return fn


def check_mapping_name(spec: str, key: str = KEY) -> tuple[str, str]:
    """(module, function) of `module:function`, without importing anything."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        fail(key, f"must look like 'module:function', got {show(spec)}")
    return module_name, fn_name
