"""Custom stack -> time mappings for the tests; CALLS records every call's arguments."""

CALLS = []


def my_mapping(stack_idx, max_stacks, num_time_steps):
    CALLS.append((stack_idx, max_stacks, num_time_steps))
    return min(7 * stack_idx + 3, num_time_steps - 1)


def bad_mapping(stack_idx, max_stacks, num_time_steps):
    return num_time_steps  # out of range on purpose


def wrong_signature(stack_idx):
    return stack_idx


def by_depth_fraction(stack_idx, max_stacks, num_time_steps):
    """The share of the rack's depth a stack sits at: depends on max_stacks."""
    return (num_time_steps - 1) * stack_idx // max(1, max_stacks - 1)
