"""stackwise_ray: progressive (stack-by-stack) transformer training on Ray Train and Tune.

Public names are imported on first use, so `python -m stackwise_ray.train` can reject a
bad config before torch and Ray load.
"""

_EXPORTS = {
    "StackWiseConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "ProgressiveRackBuilder": "builder",
    "create_stack_from_config": "builder",
    "ProgressiveDataLoader": "data",
    "TimeStepMasking": "masking",
    "ProgressiveTrainer": "trainer",
    "load_rack": "checkpoint",
    "save_rack": "checkpoint",
    "evaluate_rack": "inference",
    "sample": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stackwise_ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
