"""Block, Stack, Rack: a plain pre-norm transformer that grows one stack at a time.

Modules take plain numbers, never a config object (builder.py turns config into
arguments). The residual stream between stacks is float32; a stack of another
precision casts on entry and casts back on exit.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); rotate channel pairs (even, odd) by position-dependent angles
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, causal: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.causal = n_heads, n_kv_heads, causal
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x, cos, sin, key_mask):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        mask = None
        if key_mask is not None:  # padded keys are never attended to
            mask = key_mask[:, None, None, :]  # (B, 1, 1, T)
            if self.causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, d_ff, causal, norm_eps):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, causal)
        self.mlp_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x, cos, sin, key_mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask)
        return x + self.mlp(self.mlp_norm(x))


def sinusoidal_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device).float() / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeConditioning(nn.Module):
    """Time step -> d_model vector added to a stack's input. Each stack owns one, so a
    frozen trunk's outputs never change when a new stack learns its own."""

    def __init__(self, encoding: str, dim: int, d_model: int, num_time_steps: int):
        super().__init__()
        self.encoding, self.dim = encoding, dim
        self.table = nn.Embedding(num_time_steps, dim) if encoding == "learned" else None
        self.proj = nn.Linear(dim, d_model)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: (B,) long -> (B, d_model)
        feats = self.table(t) if self.table is not None else sinusoidal_features(t, self.dim)
        return self.proj(feats.to(self.proj.weight.dtype))


class Stack(nn.Module):
    """n blocks plus their time conditioning; `time_step` is the stack's depth time."""

    def __init__(self, stack_id, n_blocks, d_model, n_heads, n_kv_heads, d_ff, causal, norm_eps,
                 time_encoding, time_dim, num_time_steps, time_step):
        super().__init__()
        self.stack_id, self.time_step = stack_id, time_step
        self.time = TimeConditioning(time_encoding, time_dim, d_model, num_time_steps)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, n_kv_heads, d_ff, causal, norm_eps) for _ in range(n_blocks))
        self.precision = "full"
        self.compute_dtype = torch.float32

    def forward(self, x, t, cos, sin, key_mask):
        # x: (B, T, C) float32 residual stream; t: (B,) time steps
        h = x.to(self.compute_dtype) + self.time(t).to(self.compute_dtype)[:, None, :]
        for block in self.blocks:
            h = block(h, cos, sin, key_mask)
        return h.float()


class Rack(nn.Module):
    """Embedding, stacks (input side first), final norm, head tied to the embedding."""

    def __init__(self, vocab_size, d_model, max_seq_len, n_heads, pad_id, tie_embeddings=True,
                 rope_theta=10000.0, norm_eps=1e-5, time_interpretation="depth", init_std=0.02):
        super().__init__()
        self.pad_id, self.time_interpretation = pad_id, time_interpretation
        self.embed = nn.Embedding(vocab_size, d_model)
        self.stacks = nn.ModuleList()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=init_std)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=init_std)
        cos, sin = rotary_tables(max_seq_len, d_model // n_heads, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed(idx)  # (B, T, C)

    def run_stacks(self, h, idx, time_steps=None, start=0, end=None):
        """Run rack positions [start, end) on the residual stream h (B, T, C)."""
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        key_mask = idx != self.pad_id  # (B, T)
        for stack in self.stacks[start:end]:
            if self.time_interpretation == "depth" or time_steps is None:
                t = torch.full((idx.shape[0],), stack.time_step, dtype=torch.long, device=idx.device)
            else:
                t = time_steps
            h = stack(h, t, cos, sin, key_mask)
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))  # (B, T, vocab)

    def forward(self, idx, time_steps=None, targets=None, loss_mask=None, hidden=None, start=0):
        """Returns (logits, loss). `hidden`, if given, is the residual stream entering rack
        position `start` (a cached trunk output); idx is still needed for padding."""
        h = self.embed_tokens(idx) if hidden is None else hidden
        logits = self.readout(self.run_stacks(h, idx, time_steps, start=start))
        loss = None if targets is None else masked_cross_entropy(logits, targets, loss_mask)
        return logits, loss


def masked_cross_entropy(logits, targets, loss_mask=None):
    if loss_mask is None:
        loss_mask = targets != -100
    if not loss_mask.any():
        return logits.sum() * 0.0  # keeps the graph; no position to learn from
    return F.cross_entropy(logits[loss_mask].float(), targets[loss_mask])
