"""A custom stack -> time mapping that raises when called (used by custom_mapping_raises.yaml)."""


def raises(stack_idx, max_stacks, num_time_steps):
    return num_time_steps // (stack_idx - stack_idx)  # ZeroDivisionError on purpose
