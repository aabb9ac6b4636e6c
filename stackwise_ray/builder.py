"""ProgressiveRackBuilder: the one place where the rack grows and trainability is set.

Stack ids are creation order (stack k is trained in phase k); rack positions run from
the input side to the head. In append mode they agree; in prepend mode stack k sits at
position 0 and the trunk between it and the head.

What trains in a phase (the new stack, the trunk's weights or adapters, the embedding and
head) is the phase's PhasePlan (plan.py); the final norm trains in every phase.

new_stack_init copy starts a new stack as a copy of the trained stack it sits next to
(the last one in append mode, the first one in prepend mode: always stack k-1): its
weights, norms, time conditioning and stack LoRA, cast to its own precision. The new
stack keeps its own stack_id and depth time step, so its copied time conditioning is
applied to its own time; a stack with a multiple of stack k-1's blocks gets its blocks
repeated. copy_trunk (G_stack) copies every trunk block in rack order,
repeated to fill the new stack; copy_middle (MIDAS) the trunk's middle blocks; both take
the time conditioning of stack k-1. identity keeps the random blocks but zeroes their
residual output projections and the time projection, so the new stack is the identity
and the grown rack computes exactly what the trunk did.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from . import adapters
from .config import ConfigError, StackWiseConfig, can_copy_weights, stack_lora_params
from .data.tokenizer import load_tokenizer
from .model import Rack, Stack
from .plan import PhasePlan, phase_plan
from .time_mapping import depth_time_step
from .precision import apply_precision, compute_dtype, precision_support, unquantized_layers, weight_bytes


def create_stack_from_config(stack_id: int, n_blocks: int, config: StackWiseConfig,
                             precision: str | None = None, time_step: int | None = None) -> Stack:
    """A new stack as the config describes it: blocks, time conditioning and depth time,
    precision applied to its weights, and its stack LoRA when qlora_enabled.

    `time_step` is the stack's depth time when it is known as data (a saved rack's); None
    computes it from the config's time mapping."""
    m, p = config.model, config.training.progressive
    precision = precision or config.stack_precision(stack_id)
    stack = Stack(
        stack_id, n_blocks, m.d_model, m.n_heads, m.n_kv_heads or m.n_heads, m.ffn_size,
        config.causal, m.norm_eps, p.time_encoding_type, p.time_embedding_dim, p.num_time_steps,
        time_step=depth_time_step(config, stack_id) if time_step is None else time_step)
    for module in stack.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=m.init_std)
    apply_precision(stack, precision)
    stack.precision, stack.compute_dtype = precision, compute_dtype(precision)
    if p.qlora_enabled:
        rank, alpha = stack_lora_params(stack_id, p)
        adapters.add_adapter(stack, adapters.STACK_ADAPTER, rank, alpha, p.qlora_dropout)
    return stack


@torch.no_grad()
def copy_stack_weights(source: Stack, stack: Stack) -> None:
    """Give `stack` the values of every parameter and buffer of `source` (cast to its
    dtypes), trunk adapters excepted: a stack being copied has none yet, and a new stack
    never has one. 4-bit weights are copied with their quantization state."""
    check_copy(source.precision, stack.precision, "copy")
    copy_module_weights(source, stack, f"stack {stack.stack_id} and stack {source.stack_id}")


def check_copy(source: str, new: str, op: str) -> None:
    if not can_copy_weights(source, new):
        raise ValueError(f"new_stack_init {op}: a 4-bit stack copies only from a stack of its own precision, "
                         f"not {source} into {new}")


@torch.no_grad()
def copy_module_weights(source: nn.Module, target: nn.Module, what: str) -> None:
    """Give `target` the values of every parameter and buffer of `source` (a stack or a
    block), by name, trunk adapters excepted; 4-bit weights with their quantization state.
    Names are compared without peft's `.base_layer`: a trunk block that carries only a
    trunk adapter copies into a block that carries none."""
    theirs = {n.replace(".base_layer", ""): t for n, t in [*source.named_parameters(), *source.named_buffers()]
              if f".{adapters.TRUNK_ADAPTER}." not in n}
    mine = {n.replace(".base_layer", ""): (n, t) for n, t in [*target.named_parameters(), *target.named_buffers()]}
    bad = sorted(n for n in set(mine) | set(theirs)
                 if n not in mine or n not in theirs or mine[n][1].shape != theirs[n].shape)
    if bad:  # copy_ would broadcast a mismatch silently
        raise ValueError(f"new_stack_init: {what} differ in shape at {bad[:3]} (blocks, sizes or LoRA ranks)")
    for key, (name, tensor) in mine.items():
        if hasattr(tensor, "quant_state"):  # bitsandbytes 4-bit: codes and their scales go together
            module_name, attr = name.rsplit(".", 1)
            setattr(target.get_submodule(module_name), attr, copy.deepcopy(theirs[key]))
        else:
            tensor.copy_(theirs[key])


def trunk_blocks_for(trunk: list[Stack], n_blocks: int, op: str) -> list[tuple[Stack, int]]:
    """(trunk stack, block index) that each of a new stack's `n_blocks` blocks copies: the
    trunk's blocks in rack order, repeated (copy_trunk, G_stack: n_blocks a multiple of
    theirs), or the `n_blocks` in the middle of them (copy_middle, MIDAS)."""
    blocks = [(s, i) for s in trunk for i in range(len(s.blocks))]
    if op == "copy_trunk":
        if n_blocks % len(blocks):
            raise ValueError(f"new_stack_init copy_trunk: {n_blocks} blocks are not a multiple of the trunk's {len(blocks)}")
        return blocks * (n_blocks // len(blocks))
    if n_blocks > len(blocks):
        raise ValueError(f"new_stack_init copy_middle: {n_blocks} blocks, more than the trunk's {len(blocks)}")
    start = (len(blocks) - n_blocks) // 2
    return blocks[start:start + n_blocks]


@torch.no_grad()
def grow_from_trunk(trunk: list[Stack], neighbour: Stack, stack: Stack, op: str) -> None:
    """copy_trunk or copy_middle: the new stack's blocks copy trunk blocks (trunk_blocks_for),
    its time conditioning that of `neighbour` (stack k-1)."""
    for source in trunk:
        check_copy(source.precision, stack.precision, op)
    for block, (source, i) in zip(stack.blocks, trunk_blocks_for(trunk, len(stack.blocks), op)):
        copy_module_weights(source.blocks[i], block, f"a block of stack {stack.stack_id} and block {i} of stack "
                                                     f"{source.stack_id}")
    copy_module_weights(neighbour.time, stack.time, f"the time conditioning of stacks {stack.stack_id} and "
                                                    f"{neighbour.stack_id}")


@torch.no_grad()
def start_as_identity(stack: Stack) -> None:
    """Zero what a stack adds to the residual stream: every block's attention and MLP output
    projection and the time projection (their base weights; a stack LoRA's B starts at zero
    already), so the stack passes its input on unchanged."""
    if stack.precision != "full":
        raise ValueError(f"new_stack_init identity: a {stack.precision} stack rounds the stream it passes on")
    layers = [m for b in stack.blocks for m in (b.attn.o_proj, b.mlp.down_proj)] + [stack.time.proj]
    for layer in layers:
        base = getattr(layer, "base_layer", layer)  # a peft LoRA layer wraps the projection
        base.weight.zero_()
        if base.bias is not None:
            base.bias.zero_()


class ProgressiveRackBuilder:
    """Grows a Rack stack by stack.

    Args:
        config: a StackWiseConfig; None builds the default config, updated with
            `model_overrides` (e.g. d_model=256, n_heads=8) as in the source document.
        building_mode: "append" or "prepend"; None takes training.progressive.building_mode.
        default_precision: precision of stacks not given one; None takes
            training.progressive.stack_precisions / new_stack_precision.
        import_code: False for a config that came with a rack from elsewhere: its custom
            time mapping is never imported, so every stack must be given its time_step.
    """

    def __init__(self, config: StackWiseConfig | None = None, building_mode: str | None = None,
                 default_precision: str | None = None, import_code: bool = True, **model_overrides):
        if config is None:
            config = StackWiseConfig()
            fields = {f.name for f in dataclasses.fields(config.model)}
            for key, value in model_overrides.items():
                if key not in fields:
                    raise ConfigError(f"model.{key}: unknown key")
                setattr(config.model, key, value)
        elif model_overrides:
            raise TypeError("pass model settings either in config or as keyword arguments, not both")
        self.config = config.validate()
        self.import_code = import_code
        p = config.training.progressive
        self.building_mode = building_mode or p.building_mode
        if self.building_mode not in ("append", "prepend"):
            raise ConfigError(f"building_mode: must be append or prepend, got {self.building_mode!r}")
        self.default_precision = default_precision
        self.plan: list[dict] = []  # how each stack was added, in creation order (rebuilds the rack)
        tokenizer = load_tokenizer(config.data.tokenizer)
        m = config.model
        self.rack = Rack(m.vocab_size or tokenizer.vocab_size, m.d_model, m.max_seq_len, m.n_heads,
                         tokenizer.pad_id, m.tie_embeddings, m.rope_theta, m.norm_eps,
                         p.time_interpretation, m.init_std)

    # ------------------------------------------------------------------ growing
    @property
    def num_stacks(self) -> int:
        return len(self.rack.stacks)

    @property
    def stack_ids(self) -> list[int]:
        """Stack ids in rack order, input side first."""
        return [s.stack_id for s in self.rack.stacks]

    def stack(self, stack_id: int) -> Stack:
        return next(s for s in self.rack.stacks if s.stack_id == stack_id)

    def position(self, stack_id: int) -> int:
        return self.stack_ids.index(stack_id)

    @property
    def time_steps(self) -> dict[int, int]:
        """Stack id -> depth time step, as the stacks hold them."""
        return {s.stack_id: s.time_step for s in self.rack.stacks}

    def append_stack(self, n_blocks: int | None = None, precision: str | None = None,
                     time_step: int | None = None) -> Stack:
        return self._add(n_blocks, precision, at_input_side=False, time_step=time_step)

    def prepend_stack(self, n_blocks: int | None = None, precision: str | None = None,
                      time_step: int | None = None) -> Stack:
        return self._add(n_blocks, precision, at_input_side=True, time_step=time_step)

    def add_stack(self, n_blocks: int | None = None, precision: str | None = None,
                  time_step: int | None = None) -> Stack:
        """Add a stack where building_mode says; `time_step` None: the config's time mapping."""
        return self._add(n_blocks, precision, self.building_mode == "prepend", time_step)

    def _add(self, n_blocks, precision, at_input_side, time_step=None) -> Stack:
        p = self.config.training.progressive
        stack_id = self.num_stacks
        if stack_id >= p.max_stacks:
            raise ValueError(f"training.progressive.max_stacks is {p.max_stacks}: cannot add stack {stack_id}")
        if time_step is None and not self.import_code and p.stack_time_mapping == "custom":
            raise ConfigError(f"training.progressive.custom_time_mapping: {p.custom_time_mapping} came with a rack "
                              f"and is not imported: give stack {stack_id} its time_step")
        if precision is None and self.default_precision is not None and stack_id not in p.stack_precisions:
            precision = self.default_precision
        stack = create_stack_from_config(stack_id, n_blocks or self.config.stack_blocks(stack_id), self.config, precision,
                                         time_step)
        if self.rack.stacks:  # before the sources get a trunk adapter
            neighbour = self.rack.stacks[0 if at_input_side else -1]
            if p.new_stack_init == "copy" and len(stack.blocks) == len(neighbour.blocks):
                copy_stack_weights(neighbour, stack)
            elif p.new_stack_init == "copy":  # a larger stack: stack k-1's blocks, repeated
                grow_from_trunk([neighbour], neighbour, stack, "copy_trunk")
            elif p.new_stack_init in ("copy_trunk", "copy_middle"):
                grow_from_trunk(list(self.rack.stacks), neighbour, stack, p.new_stack_init)
            elif p.new_stack_init == "identity":
                start_as_identity(stack)
        if p.progressive_qlora:
            for trunk_stack in self.rack.stacks:
                if adapters.TRUNK_ADAPTER not in adapters.adapter_params(trunk_stack):
                    adapters.add_adapter(trunk_stack, adapters.TRUNK_ADAPTER, p.progressive_qlora_rank,
                                         p.progressive_qlora_alpha, p.qlora_dropout)
        self.rack.stacks.insert(0 if at_input_side else self.num_stacks, stack)
        self.plan.append({"n_blocks": len(stack.blocks), "precision": stack.precision, "at_input_side": at_input_side})
        return stack

    def add_planned_stack(self, plan: PhasePlan) -> Stack:
        """Add the stack phase `plan` trains, as the plan describes it."""
        if plan.stack_id != self.num_stacks:
            raise ValueError(f"the rack holds {self.num_stacks} stacks: phase {plan.stack_id} cannot add its stack")
        return self._add(plan.n_blocks, plan.precision, plan.at_input_side, plan.time_step)

    def build_rack(self) -> Rack:
        """The rack as grown so far (the same object every call: stacks are added to it in
        place). The source document's name; code here reads `self.rack`."""
        return self.rack

    def hold(self, trained: "ProgressiveRackBuilder") -> None:
        """Hold the rack of `trained` (a builder loaded from a run's final checkpoint), how
        its stacks were added and its config: a caller's builder after the run trained it."""
        self.rack, self.plan, self.config, self.import_code = trained.rack, trained.plan, trained.config, trained.import_code

    # ------------------------------------------------------------------ trainability
    def freeze_trunk(self, indices) -> None:
        """Freeze every parameter of these stacks, LoRA included."""
        for i in indices:
            for param in self.stack(i).parameters():
                param.requires_grad_(False)

    def freeze_all_but_qlora(self, indices) -> None:
        """Only the LoRA adapters (stack and trunk) of these stacks train."""
        for i in indices:
            for name, param in self.stack(i).named_parameters():
                param.requires_grad_(adapters.is_lora_param(name))

    def prepare_phase(self, plan: PhasePlan | None = None) -> None:
        """Set requires_grad for phase `plan`, whose stack is the newest (default: the plan
        of the newest stack's phase under this builder's config)."""
        newest = self.stack(self.num_stacks - 1)  # stack ids are creation order
        if plan is None:
            plan = phase_plan(self.config, newest.stack_id, len(newest.blocks), newest.precision,
                              time_step=newest.time_step)
        if plan.stack_id != newest.stack_id:
            raise ValueError(f"phase {plan.stack_id} is not the phase of the newest stack, {newest.stack_id}")
        trunk = [i for i in self.stack_ids if i != plan.stack_id]
        for i in [plan.stack_id, *trunk] if plan.trunk_strategy == "full" else [plan.stack_id]:
            for param in self.stack(i).parameters():
                param.requires_grad_(param.is_floating_point())  # 4-bit base weights cannot train
        if plan.trunk_strategy == "qlora":
            self.freeze_all_but_qlora(trunk)
        elif plan.trunk_strategy == "frozen":
            self.freeze_trunk(trunk)
        self.rack.embed.weight.requires_grad_(plan.embedding_trains)
        self.rack.head.weight.requires_grad_(plan.head_trains)
        for param in self.rack.norm.parameters():
            param.requires_grad_(True)

    def prepare_end_to_end(self) -> None:
        """Every stack and rack-level parameter trains (the compute-matched baseline)."""
        for param in self.rack.parameters():
            param.requires_grad_(param.is_floating_point())

    # ------------------------------------------------------------------ reporting
    def get_rack_info(self) -> dict:
        stacks = []
        device = next(self.rack.parameters()).device
        for pos, stack in enumerate(self.rack.stacks):
            params = list(stack.parameters())
            lora_bytes = sum(p.numel() * p.element_size() for n, p in stack.named_parameters() if adapters.is_lora_param(n))
            stacks.append({
                "stack_id": stack.stack_id,
                "position": pos,
                "n_blocks": len(stack.blocks),
                "precision": stack.precision,
                "precision_note": precision_support(stack.precision, device),
                "unquantized_layers": unquantized_layers(stack),  # {name: why}, in a 4-bit stack
                "weight_bytes": weight_bytes(stack) - lora_bytes,  # base weights as stored
                "adapter_bytes": lora_bytes,
                "params": sum(p.numel() for p in params),
                "trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "adapters": adapters.adapter_params(stack),
                "time_step": stack.time_step,
            })
        all_params = list(self.rack.parameters())
        return {
            "building_mode": self.building_mode,
            "num_stacks": self.num_stacks,
            "stack_order": self.stack_ids,
            "stacks": stacks,
            "total_params": sum(p.numel() for p in all_params),
            "trainable_params": sum(p.numel() for p in all_params if p.requires_grad),
            "weight_bytes": weight_bytes(self.rack),
        }
