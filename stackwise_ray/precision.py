"""Per-stack precision: changes how a stack's weights are stored and computed.

full/half/bfloat16 cast the stack. qlora and nvfp4 replace every nn.Linear by a
frozen 4-bit layer (bitsandbytes NF4, or emulated NVFP4) that trains only through
a LoRA adapter added afterwards; norms and embeddings stay float32. A linear layer
whose input width does not fit the format's blocks stays float32 and frozen as well
(FrozenLinear), so the stack's base still trains only through LoRA.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from stackwise_ray.config import COMPUTE_DTYPES, PRECISIONS

_COMPUTE_DTYPE = {precision: getattr(torch, name) for precision, name in COMPUTE_DTYPES.items()}

NF4_BLOCK = 64  # values per absmax scale in bitsandbytes' 4-bit formats (its default blocksize)
NVFP4_NOTE = "nvfp4 emulated: weights stored as packed E2M1 + FP8 scales, dequantized to float32 per matmul"


class _DropKernelsCommunityNotice(logging.Filter):
    """bitsandbytes logs at import, on CPUs with AVX512-BF16, that the optional
    kernels-community gemm_4bit_forward kernel is missing. That kernel serves only the
    packed CPU path, which this package keeps bitsandbytes off (see _to_qlora), so the
    notice would be noise in every Ray worker's output; bitsandbytes' other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# installed before anything imports bitsandbytes (peft imports it too): the notice is logged at import
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsCommunityNotice())


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def compute_dtype(precision: str) -> torch.dtype:
    _check(precision)
    return _COMPUTE_DTYPE[precision]


# -----------------------------------------------------------------------------
# NVFP4: FP4 E2M1 values, one FP8 E4M3 scale per 16 inputs, one float32 tensor scale

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # index == E2M1 bit pattern
_MIDPOINTS = (E2M1[1:] + E2M1[:-1]) / 2
NVFP4_BLOCK = 16
FP8_MAX = 448.0


def quantize_nvfp4(w: torch.Tensor):
    """(out, in) float -> (packed uint8 codes (out, in/2), fp8 block scales (out, in/16), float32 global scale)."""
    out_f, in_f = w.shape
    w = w.detach().float().reshape(out_f, in_f // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = w.abs().amax()
    # global scale puts the largest block scale at the top of the fp8 range
    global_scale = torch.where(amax > 0, amax / (6 * FP8_MAX), torch.ones_like(amax))
    block_scale = (w.abs().amax(-1) / 6 / global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    scale = (block_scale.float() * global_scale).unsqueeze(-1)  # exactly what dequantize uses
    x = torch.where(scale > 0, w / scale, torch.zeros_like(w))
    a = x.abs().clamp(max=6.0)
    mid = _MIDPOINTS.to(w.device)
    idx = torch.bucketize(a, mid)  # nearest magnitude, ties go to the smaller one...
    tie = (a == mid[idx.clamp(max=len(mid) - 1)]) & (idx % 2 == 1)
    idx = idx + tie.long()  # ...then to the even code, as the hardware rounds
    codes = (idx | ((x < 0).long() << 3)).to(torch.uint8).reshape(out_f, in_f)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, block_scale, global_scale.float()


def dequantize_nvfp4(packed, block_scale, global_scale) -> torch.Tensor:
    out_f = packed.shape[0]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(out_f, -1).long()
    mag = E2M1.to(packed.device)[codes & 7]
    val = torch.where(codes >= 8, -mag, mag)
    scale = (block_scale.float() * global_scale).unsqueeze(-1)
    return (val.reshape(out_f, -1, NVFP4_BLOCK) * scale).reshape(out_f, -1)


class NVFP4Linear(nn.Linear):
    """Frozen Linear stored in NVFP4 (emulated: dequantized to float32 for each matmul).

    Subclasses nn.Linear so peft wraps it with its LoRA Linear, but holds no float
    weight: `weight` is a read-only dequantized view. Codes, scales and bias are
    buffers, so they are saved, loaded and moved with the module and never trained.
    in_features must be a multiple of 16 (no padding).
    Caveat: peft merge_adapter on this layer would add to a temporary and do nothing.
    """

    def __init__(self, in_features, out_features, bias=True, device=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a float weight Parameter
        if in_features % NVFP4_BLOCK:
            raise ValueError(f"NVFP4Linear needs in_features divisible by {NVFP4_BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("block_scale", torch.zeros(out_features, in_features // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("global_scale", torch.ones((), device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NVFP4Linear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        q.codes, q.block_scale, q.global_scale = quantize_nvfp4(w)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def dequantize(self) -> torch.Tensor:
        return dequantize_nvfp4(self.codes, self.block_scale, self.global_scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # a model-wide .half() must not rewrite the packed format: follow device moves only
        for k, t in self._buffers.items():
            if t is not None:
                new = fn(t)
                self._buffers[k] = new if new.dtype == t.dtype else t.to(new.device)
        return self


# -----------------------------------------------------------------------------


class FrozenLinear(nn.Linear):
    """A float Linear left unquantized in a 4-bit stack because its input width does not
    fit the format's blocks (`reason` says how). Frozen like the 4-bit layers around it:
    weight and bias are buffers, so they are saved, loaded and moved with the module and
    never trained; nn.Linear.forward computes with them unchanged."""

    def __init__(self, linear: nn.Linear, reason: str):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate weight Parameters
        self.in_features, self.out_features, self.reason = linear.in_features, linear.out_features, reason
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())


def _misfit(linear: nn.Linear, precision: str) -> str | None:
    """Why `linear` cannot be stored in `precision`'s 4-bit format, or None if it can."""
    n = linear.in_features
    if precision == "qlora" and n < NF4_BLOCK:
        # one NF4 absmax scale would span several rows, for a few bytes saved
        return f"in_features {n} < {NF4_BLOCK}, the NF4 block size: kept float32, frozen"
    if precision == "nvfp4" and n % NVFP4_BLOCK:
        return f"in_features {n} is not a multiple of {NVFP4_BLOCK}, the NVFP4 block size: kept float32, frozen"
    return None


def _to_qlora(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    # Keep bitsandbytes off its packed CPU path. On a CPU with AVX512-BF16 it would, at
    # the first forward in eval mode without grad, rewrite the weight in place into a
    # layout whose matmul runs in bfloat16 with bfloat16 scales, and keep it: evaluation,
    # sampling and cache builds would differ from the training forward and between CPUs,
    # a checkpoint saved after an evaluation would hold the rounded scales, later
    # train-mode forwards would pass no gradient to their input (or fail, with a bias),
    # and the rewrite crashes for a layer whose input width is not a multiple of the
    # block size (the default d_ff, 352 at d_model 128, is one).
    q.support_avx512bf16_for_cpu = False
    q.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu(), requires_grad=False, blocksize=NF4_BLOCK,
                                 compress_statistics=True, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    return q.to(device)  # Params4bit quantizes on this move


def _replace_linears(module: nn.Module, precision: str) -> None:
    for m in module.modules():
        if hasattr(m, "base_layer") or (isinstance(m, nn.Linear) and type(m) is not nn.Linear):
            raise ValueError(f"apply_precision needs plain nn.Linear layers (call it before adding LoRA), found {type(m).__name__}")
    quantize = _to_qlora if precision == "qlora" else NVFP4Linear.from_linear
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                reason = _misfit(child, precision)
                setattr(parent, name, FrozenLinear(child, reason) if reason else quantize(child))


def apply_precision(module: nn.Module, precision: str) -> nn.Module:
    """Set the storage/compute precision of a stack in place; returns the same module."""
    _check(precision)
    if precision in ("half", "bfloat16", "full"):
        return module.to(_COMPUTE_DTYPE[precision])
    if type(module) is nn.Linear:
        raise ValueError("apply_precision cannot replace a bare nn.Linear in place; wrap it in a container module")
    module.to(torch.float32)
    _replace_linears(module, precision)
    if precision == "qlora":
        module.is_loaded_in_4bit = True  # makes peft pick its bitsandbytes-aware LoRA layer
    return module


def unquantized_layers(module: nn.Module) -> dict[str, str]:
    """{layer name: reason} for the layers of a 4-bit stack left in float32."""
    return {name.removesuffix(".base_layer"): m.reason for name, m in module.named_modules()
            if isinstance(m, FrozenLinear)}


def _quant_state_tensors(qs):
    if qs is None:
        return
    for v in vars(qs).values():
        if torch.is_tensor(v):
            yield v
        elif type(v).__name__ == "QuantState":
            yield from _quant_state_tensors(v)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by parameters, buffers and bitsandbytes quant states, each storage counted once."""
    seen, total = set(), 0
    tensors = []
    for p in module.parameters():
        tensors.append(p)
        tensors.extend(_quant_state_tensors(getattr(p, "quant_state", None)))
    tensors.extend(b for b in module.buffers())
    for t in tensors:
        s = t.untyped_storage()
        key = (t.device, s.data_ptr()) if s.data_ptr() else id(t)
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def precision_support(precision: str, device) -> str | None:
    """None if `precision` runs natively on `device`, a note if emulated or slow; RuntimeError if it cannot run."""
    _check(precision)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"precision {precision}: device {device} requested but CUDA is not available")
    if precision == "full":
        return None
    if precision == "half":
        return "float16 on CPU runs without hardware support (slow)" if device.type == "cpu" else None
    if precision == "bfloat16":
        if cuda and torch.cuda.get_device_capability(device)[0] < 8:
            name = torch.cuda.get_device_name(device)
            raise RuntimeError(f"precision bfloat16: {name} has no bfloat16 support (needs compute capability >= 8.0)")
        return None
    if precision == "nvfp4":
        return NVFP4_NOTE  # no native FP4 kernels are used, even on Blackwell
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise RuntimeError(f"precision qlora needs bitsandbytes, which cannot be imported: {e}") from None
    if not cuda:
        return f"qlora on {device.type}: bitsandbytes dequantizes NF4 weights per matmul (slow)"
    return None
