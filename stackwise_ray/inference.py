"""Use a trained rack: evaluate it like the run did, and sample text from it."""

from __future__ import annotations

import math

import torch

from .builder import ProgressiveRackBuilder
from .data.dataset import build_datasets
from .data.loader import GlobalBatches, ProgressiveDataLoader
from .data.tokenizer import load_tokenizer
from .masking import TimeStepMasking, mask_rate
from .phase import evaluate


def evaluate_rack(builder: ProgressiveRackBuilder, val_ds=None) -> dict:
    """Validation numbers computed exactly as the last phase reported them: the same
    batches, the same corruption (keyed by example id) and the full rack from tokens.

    `val_ds` None reads the data the rack's config names, under its storage path: for
    your own racks. A rack from elsewhere gets the split of data you name
    (sample.evaluation_split), so that its config chooses nothing this machine reads."""
    config = builder.config
    if val_ds is None:
        _, val_ds, _ = build_datasets(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    masking = TimeStepMasking(config, tokenizer, time_steps=builder.time_steps)  # the rack's own steps, no mapping called
    newest = builder.num_stacks - 1
    batches = ProgressiveDataLoader(GlobalBatches(val_ds, min(config.data.batch_size, len(val_ds)),
                                                  config.training.seed, shuffle=False), masking, newest)
    return evaluate(builder.rack, batches, config.training.eval_batches,
                    token_bytes=torch.from_numpy(tokenizer.token_bytes()))


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits (N, V); returns (tokens, their probabilities)."""
    if temperature <= 0:
        probs = torch.softmax(logits, -1)
        tok = probs.argmax(-1)
        return tok, probs.gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, probs.gather(-1, tok[:, None])[:, 0]


def sample(builder: ProgressiveRackBuilder, prompt: str = "", length: int = 64, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0, steps: int = 16) -> str:
    """Generate text: left to right for clm, iterative unmasking for mlm."""
    tok = load_tokenizer(builder.config.data.tokenizer)
    ids = tok.encode(prompt)[-(builder.config.model.max_seq_len - 1):] or [tok.bos_id]
    return tok.decode(generate(builder, ids, length, temperature, top_k, seed, steps))


@torch.no_grad()
def generate(builder: ProgressiveRackBuilder, ids: list[int], length: int, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0, steps: int = 16) -> list[int]:
    """Token ids: the prompt `ids` followed by `length` generated tokens (mlm: at most
    max_seq_len in all, every mask filled)."""
    config, rack = builder.config, builder.rack.eval()
    tok = load_tokenizer(config.data.tokenizer)
    special = torch.tensor(sorted(tok.special_ids))
    g = torch.Generator().manual_seed(seed)
    ids = list(ids)
    T = config.model.max_seq_len
    t0 = torch.zeros(1, dtype=torch.long)  # time-as-input: a clean step for generation
    if config.training.progressive.training_objective != "mlm":
        for _ in range(length):
            x = torch.tensor([ids[-T:]])
            logits, _ = rack(x, time_steps=t0)
            step_logits = logits[:, -1].float()
            step_logits[:, special] = float("-inf")
            nxt, _ = pick(step_logits, temperature, top_k, g)
            ids.append(int(nxt))
        return ids
    length = min(length, T - len(ids))
    x = torch.tensor([ids + [tok.mask_id] * length])
    masked = x == tok.mask_id
    p = config.training.progressive
    for i in range(steps):
        frac = masked.float().mean().item()
        # time-as-input: the step whose mask rate matches what is still masked
        t = min(range(p.num_time_steps), key=lambda s: abs(mask_rate(s, p.num_time_steps, p.min_mask_rate, p.max_mask_rate) - frac))
        logits, _ = rack(x, time_steps=torch.tensor([t]))
        logits = logits[0].float()
        logits[:, special] = float("-inf")
        cand, conf = pick(logits, temperature, top_k, g)
        remaining = int(masked.sum())
        # cosine schedule: how many positions stay masked after this step
        keep_masked = int(remaining * math.cos(math.pi / 2 * (i + 1) / steps)) if i < steps - 1 else 0
        conf = torch.where(masked[0], conf, torch.tensor(-1.0))
        reveal = conf.argsort(descending=True)[: remaining - keep_masked]
        x[0, reveal] = cand[reveal]
        masked[0, reveal] = False
    return x[0].tolist()
