"""Time interpretation, corruption and training objectives.

A stack index maps to a diffusion-style time step (time_mapping.py), a
time step maps to a corruption rate (`mask_rate`), and `TimeStepMasking` turns
a batch into corrupted inputs, targets and loss masks for one of three
objectives: mlm (masked denoising), clm (next token) and custom (targets come
with the data).

Corruption scheme, and why it is shaped this way
------------------------------------------------
The trainer may cache the frozen trunk's outputs per example and reuse them
while it trains a new stack (append mode). A cached activation is only valid
if the trunk sees exactly the same input every time, so the corruption of an
example must never depend on the phase, the epoch, the batch it lands in or
the global RNG:

* Every random number for an example comes from its own `torch.Generator`,
  seeded from (training.seed, example_id). The draws are laid out per
  position (u, v, w), so position i gets the same numbers whatever the
  padded length of the batch. Priorities are drawn before the rate is known,
  so a higher rate corrupts a superset of the positions a lower rate does.
* depth interpretation: the rate is set by the stack at the INPUT side of the
  rack. In append mode that is always stack 0, so the corruption never
  changes as stacks are appended and the cached trunk outputs stay valid.
  In prepend mode it is the newly added stack `stack_idx`, so the inputs get
  noisier with every prepended stack (the reverse-diffusion curriculum); the
  trunk then sees new inputs anyway, so there is nothing to keep valid.
* input interpretation: the time step is drawn per EXAMPLE from the same
  keyed generator (t ~ U[0,1), step = floor(t * num_time_steps)). The source
  draws one per batch; a per-batch draw would change an example's input each
  time batches are reshuffled and break the cache, so this deviates on
  purpose. The price: an example always sees the same noise level.

mlm: each position gets a priority u; non-pad positions with u < rate are
corrupted (at least one per example that has a non-pad token, so every
example reaches the loss). Of those, v < mask_token_fraction -> mask token,
the next random_token_fraction -> a random non-special token, the rest keep
their token (BERT's 80/10/10 with the defaults).
"""

from __future__ import annotations

import torch

from .config import StackWiseConfig
from .data.tokenizer import IGNORE_INDEX, load_tokenizer
from .time_mapping import load_time_mapping, resolve_mapping, time_step_for_stack

_MASK64 = (1 << 64) - 1


def mask_rate(time_step: int, num_time_steps: int, min_rate: float, max_rate: float) -> float:
    if num_time_steps <= 1:
        return min_rate
    frac = min(max(time_step / (num_time_steps - 1), 0.0), 1.0)
    return min_rate + (max_rate - min_rate) * frac


def _example_seed(seed: int, example_id: int) -> int:
    # splitmix64 of the pair: nearby (seed, id) pairs never collide the way seed * K + id can
    z = (seed * 0x9E3779B97F4A7C15 + example_id + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class TimeStepMasking:
    """Corrupts batches as the config's objective and time interpretation say.

    Args:
        config: the run's StackWiseConfig.
        tokenizer: its tokenizer; None loads config.data.tokenizer.
        time_steps: stack id -> depth time step, when they are known as data (a loaded
            rack's `builder.time_steps`); the config's time mapping is then not used, and
            a custom one is never imported. None: the time mapping computes them.
    """

    def __init__(self, config: StackWiseConfig, tokenizer=None, time_steps: dict[int, int] | None = None):
        if tokenizer is None:
            tokenizer = load_tokenizer(config.data.tokenizer)
        p = config.training.progressive
        self.tokenizer = tokenizer
        self.seed = config.training.seed
        self.time_interpretation = p.time_interpretation
        self.building_mode = p.building_mode
        self.training_objective = p.training_objective
        self.max_stacks = p.max_stacks
        self.time_per_stack = p.time_per_stack
        self.num_time_steps = p.num_time_steps
        self.min_mask_rate, self.max_mask_rate = p.min_mask_rate, p.max_mask_rate
        self.mask_token_fraction = p.mask_token_fraction
        self.random_token_fraction = p.random_token_fraction
        self.mapping, custom = resolve_mapping(p.stack_time_mapping, p.custom_time_mapping)
        self.time_steps = None if time_steps is None else dict(time_steps)
        self.custom_fn = load_time_mapping(custom) if self.mapping == "custom" and time_steps is None else None
        self.pad_id, self.mask_id = tokenizer.pad_id, tokenizer.mask_id
        special = set(tokenizer.special_ids)
        self.regular_ids = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])

    def get_time_step_for_stack(self, stack_idx: int) -> int:
        """Depth time step of stack `stack_idx`.

        In input mode this is still the depth step of that stack; the model's
        time then comes from the batch (`time_step`) instead.
        """
        if self.time_steps is not None:
            if stack_idx not in self.time_steps:
                raise ValueError(f"no stored time step for stack {stack_idx} (known: {sorted(self.time_steps)})")
            return self.time_steps[stack_idx]
        return time_step_for_stack(stack_idx, self.mapping, self.time_per_stack, self.max_stacks,
                                   self.num_time_steps, self.custom_fn)

    def _draws(self, example_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one generator per example; first value is t, then (u, v, w) per position
        t = torch.empty(len(example_ids))
        uvw = torch.empty(len(example_ids), seq_len, 3)
        g = torch.Generator()
        for b, eid in enumerate(example_ids.tolist()):
            g.manual_seed(_example_seed(self.seed, eid))
            d = torch.rand(1 + 3 * seq_len, generator=g)
            t[b] = d[0]
            uvw[b] = d[1:].view(seq_len, 3)
        return t, uvw

    def _steps_from_t(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.num_time_steps).long().clamp_(max=self.num_time_steps - 1)

    def sample_time_steps(self, example_ids: torch.Tensor) -> torch.Tensor:
        t, _ = self._draws(example_ids, 0)
        return self._steps_from_t(t)

    def _time_steps(self, t: torch.Tensor, stack_idx: int) -> torch.Tensor:
        if self.time_interpretation == "input":
            return self._steps_from_t(t)
        input_side = 0 if self.building_mode == "append" else stack_idx
        return torch.full((len(t),), self.get_time_step_for_stack(input_side), dtype=torch.long)

    def generate_masks_for_stack(self, batch: dict, stack_idx: int) -> dict:
        ids = batch["input_ids"].long()
        example_ids = batch["example_ids"]
        B, T = ids.shape
        dev = ids.device
        objective = self.training_objective
        not_pad = ids != self.pad_id
        clm_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        clm_mask[:, -1] = False

        # t is each stream's first draw whatever T is, so clm/custom skip the per-position draws
        t, uvw = self._draws(example_ids, T if objective == "mlm" else 0)
        time_step = self._time_steps(t, stack_idx)
        inputs = ids

        if objective == "mlm":
            u, v, w = (x.to(dev) for x in uvw.unbind(-1))
            rate = torch.tensor([mask_rate(s, self.num_time_steps, self.min_mask_rate, self.max_mask_rate)
                                 for s in time_step.tolist()], device=dev)
            masks = (u < rate[:, None]) & not_pad
            need = ~masks.any(1) & not_pad.any(1)
            if need.any():
                first = u.masked_fill(~not_pad, 2.0).argmin(1)
                rows = need.nonzero().squeeze(1)
                masks[rows, first[rows]] = True
            to_mask = masks & (v < self.mask_token_fraction)
            to_random = masks & ~to_mask & (v < self.mask_token_fraction + self.random_token_fraction)
            regular = self.regular_ids.to(dev)
            random_tokens = regular[(w * len(regular)).long().clamp_(max=len(regular) - 1)]
            inputs = torch.where(to_random, random_tokens, ids)
            inputs = inputs.masked_fill(to_mask, self.mask_id)
            targets = ids.clone()
            combined = masks
        elif objective == "clm":
            targets = ids.clone()
            targets[:, :-1] = ids[:, 1:]  # the last position predicts itself: never in the loss
            masks = (targets != self.pad_id) & not_pad
            combined = masks & clm_mask
        elif objective == "custom":
            if batch.get("targets") is None:
                raise ValueError("training_objective 'custom' needs 'targets' in every batch (set data.target_field)")
            targets = batch["targets"].long()
            masks = targets != IGNORE_INDEX
            combined = masks
        else:
            raise ValueError(f"unknown training_objective {objective!r}")

        out = dict(batch)
        out.update(input_ids=inputs, targets=targets, masks=masks, clm_mask=clm_mask,
                   combined_masks=combined, time_step=time_step.to(dev),
                   training_objective=objective, example_ids=example_ids.clone())
        return out
