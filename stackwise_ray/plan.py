"""PhasePlan: what one phase of a progressive run does, decided once on the driver.

Phase k adds stack k (its blocks, precision, side and depth time step), treats the trunk
one way (cached, run forward, differentiated through, or trained), may read one cache,
and trains the new stack plus the embedding and head where the rules say so. The
builder (trainability), the cache build, the phase workers, phase ids and the FLOP count
all read these plans, so each rule is written here once.

The plan holds no step count: steps depend on the training data (phase.phase_steps),
which the plan's readers have at hand; a plan is made from the config alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import COMPUTE_DTYPES, StackWiseConfig, stack_lora_params
from .time_mapping import depth_time_step


@dataclass(frozen=True)
class CachePlan:
    """What a phase reads from a cache: the stream entering rack position `position`,
    stored in `dtype`. `rounds`: that dtype is narrower than the one the stream is
    computed in, so the phase trains on rounded values (cached, or recomputed and
    rounded alike: phase.rounding_hook); it is then part of the phase's identity."""
    kind: str  # "trunk_outputs" | "trunk_inputs" | "none"
    position: int
    reason: str
    dtype: str = "float32"
    rounds: bool = False


@dataclass(frozen=True)
class PhasePlan:
    """Phase `stack_id`: the stack it adds and how it treats what is already there.

    `trunk` is how the phase's steps treat the trunk (a key of flops.TRUNK_FACTORS):
    "cached" (not run), "forward" (run, no gradient), "backward" (gradients pass through
    it, or its adapters train), "trained" (its weights train); "none" in phase 0."""
    stack_id: int
    n_blocks: int
    precision: str
    at_input_side: bool  # prepend: the new stack enters at rack position 0
    time_step: int  # the stack's depth time step
    lora: tuple | None  # the stack LoRA's (rank, alpha), when qlora_enabled
    trunk_strategy: str  # frozen | qlora | full: which trunk parameters train
    building_mode: str
    trunk: str
    cache: CachePlan
    embedding_trains: bool  # the token embedding, and a head tied to it
    head_trains: bool

    def recomputed(self, reason: str) -> "PhasePlan":
        """This phase with its trunk recomputed every step instead of read from its cache
        (a cache refused for memory)."""
        trunk, _ = trunk_and_cache(self.stack_id, self.trunk_strategy, self.building_mode, cache_activations=False)
        cache = self.cache
        return dataclasses.replace(self, trunk=trunk, cache=CachePlan("none", cache.position, reason, cache.dtype,
                                                                      cache.rounds))


def cache_dtype(config: StackWiseConfig, cache: CachePlan, below: str | None) -> tuple[str, bool]:
    """(dtype, rounds) of `cache`: ray.cache_dtype, else the dtype the cached stream is
    computed in (lossless): the embedding's (float32) for trunk inputs, for trunk outputs
    that of the stack below the position, whose precision is `below`. It rounds where it
    is narrower than that, or another 16-bit format."""
    computed = "float32" if cache.position == 0 or below is None else COMPUTE_DTYPES[below]
    configured = config.ray.cache_dtype or computed
    return configured, configured not in (computed, "float32")


def trunk_and_cache(stack_id: int, trunk_strategy: str, building_mode: str,
                    cache_activations: bool) -> tuple[str, CachePlan]:
    """How phase `stack_id` treats its trunk (PhasePlan.trunk) and which cache it reads."""
    if stack_id == 0:
        return "none", CachePlan("none", 0, "no trunk yet")
    if trunk_strategy == "full":
        return "trained", CachePlan("none", 0, "trunk_strategy full: the whole rack trains, so no trunk activation "
                                               "stays fixed")
    recomputed = "backward" if building_mode == "prepend" or trunk_strategy == "qlora" else "forward"
    if not cache_activations:
        return recomputed, CachePlan("none", 0, "cache_activations is false: the trunk is recomputed every step")
    if building_mode == "prepend":
        return recomputed, CachePlan("none", 0, "prepend: the trunk runs after the new stack, so nothing before it "
                                                "can be cached")
    if trunk_strategy == "qlora":
        return "backward", CachePlan("trunk_inputs", 0, "qlora trunk: its inputs are cached and streamed through the "
                                                        "adapted trunk")
    return "cached", CachePlan("trunk_outputs", stack_id, "frozen trunk: its outputs are cached; the phase runs no "
                                                          "trunk forward")


def phase_plan(config: StackWiseConfig, stack_id: int, n_blocks: int | None = None, precision: str | None = None,
               at_input_side: bool | None = None, time_step: int | None = None,
               below_precision: str | None = None) -> PhasePlan:
    """The plan of phase `stack_id` of `config` (a validated config); the stack's shape
    defaults to the config's, `time_step` None to the config's time mapping,
    `below_precision` (of the stack below the cache's position) to the config's."""
    p = config.training.progressive
    trunk, cache = trunk_and_cache(stack_id, p.trunk_strategy, p.building_mode, p.cache_activations)
    # from phase 1 on the embedding feeds the trunk, whose outputs may be cached: it stays
    # fixed unless the whole rack trains
    embedding = stack_id == 0 or p.trunk_strategy == "full"
    if cache.kind != "none":
        below = None if cache.position == 0 else below_precision or config.stack_precision(cache.position - 1)
        dtype, rounds = cache_dtype(config, cache, below)
        cache = dataclasses.replace(cache, dtype=dtype, rounds=rounds)
    return PhasePlan(
        stack_id=stack_id,
        n_blocks=n_blocks or config.stack_blocks(stack_id),
        precision=precision or config.stack_precision(stack_id),
        at_input_side=p.building_mode == "prepend" if at_input_side is None else at_input_side,
        time_step=depth_time_step(config, stack_id) if time_step is None else time_step,
        lora=tuple(stack_lora_params(stack_id, p)) if p.qlora_enabled else None,
        trunk_strategy=p.trunk_strategy, building_mode=p.building_mode, trunk=trunk, cache=cache,
        embedding_trains=embedding, head_trains=embedding or not config.model.tie_embeddings)


def plan_phases(config: StackWiseConfig, target_stacks: int | None = None, added: list[dict] = (),
                default_precision: str | None = None) -> list[PhasePlan]:
    """The plans of phases 0..target_stacks-1 (default: the config's target). `added`: how
    stacks already in a rack builder were added ({n_blocks, precision, at_input_side},
    ProgressiveRackBuilder.plan), which their phases keep; `default_precision` is the
    builder's, for stacks the config gives no precision."""
    p = config.training.progressive
    target = target_stacks or max(config.target_stacks, len(added))
    if target > p.max_stacks:
        raise ValueError(f"target_stacks {target} exceeds training.progressive.max_stacks={p.max_stacks}")
    if len(added) > target:
        raise ValueError(f"the rack builder already holds {len(added)} stacks, more than target_stacks={target}")
    plans = []
    for k in range(target):
        if k < len(added):
            shape = added[k]
        else:
            own = default_precision is None or k in p.stack_precisions
            shape = {"n_blocks": None, "precision": None if own else default_precision, "at_input_side": None}
        below = plans[k - 1].precision if k > 0 else None  # a trunk-output cache's position is k (append)
        plans.append(phase_plan(config, k, shape["n_blocks"], shape["precision"], shape["at_input_side"],
                                below_precision=below))
    return plans
