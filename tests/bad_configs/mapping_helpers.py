"""Custom stack -> time mappings that fail when called (used by custom_mapping_raises.yaml and custom_mapping_exits.yaml)."""


def raises(stack_idx, max_stacks, num_time_steps):
    return num_time_steps // (stack_idx - stack_idx)  # ZeroDivisionError on purpose


def exits(stack_idx, max_stacks, num_time_steps):
    raise SystemExit(0)  # ends the process on purpose (custom_mapping_exits.yaml)
