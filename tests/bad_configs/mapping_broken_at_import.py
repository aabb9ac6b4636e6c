"""A custom mapping module that fails while being imported (used by custom_mapping_module_broken.yaml)."""

raise RuntimeError("this mapping module is broken on purpose")


def schedule(stack_idx, max_stacks, num_time_steps):  # never reached
    return 0
