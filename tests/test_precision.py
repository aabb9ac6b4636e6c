import logging

import pytest
import torch
import torch.nn as nn

from stackwise_ray.precision import (
    E2M1, FrozenLinear, NVFP4Linear, apply_precision, compute_dtype, dequantize_nvfp4, precision_support,
    quantize_nvfp4, unquantized_layers, weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def pair(d=64, h=128):
    """A reference float32 block and an identical copy to convert."""
    torch.manual_seed(0)
    ref = Block(d, h)
    m = Block(d, h)
    m.load_state_dict(ref.state_dict())
    return ref, m


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("precision,dtype", [("half", torch.float16), ("bfloat16", torch.bfloat16), ("full", torch.float32)])
def test_cast_precisions(precision, dtype):
    ref, m = pair()
    assert apply_precision(m, precision) is m
    assert m.fc1.weight.dtype == dtype and m.fc2.weight.dtype == dtype
    assert compute_dtype(precision) == dtype
    x = torch.randn(4, 64)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, ref(x)) < 0.02
    expected = sum(p.numel() for p in ref.parameters()) * dtype.itemsize
    assert weight_bytes(m) == expected
    m.register_buffer("tied", m.fc1.weight.data[0])  # shares storage: counted once
    assert weight_bytes(m) == expected


def test_unknown_precision():
    with pytest.raises(ValueError):
        apply_precision(Block(), "int3")
    with pytest.raises(ValueError):
        compute_dtype("int3")
    with pytest.raises(ValueError):
        precision_support("int3", "cpu")


def test_qlora_replaces_linears():
    ref, m = pair(256, 256)
    apply_precision(m, "qlora")
    assert m.is_loaded_in_4bit
    for lin in (m.fc1, m.fc2):
        assert isinstance(lin, bnb.nn.Linear4bit)
        assert lin.weight.dtype == torch.uint8 and lin.weight.quant_state is not None
        assert not any(p.requires_grad for p in lin.parameters())  # frozen base, bias included
    assert m.norm.weight.dtype == torch.float32
    ratio = weight_bytes(m) / weight_bytes(ref)
    assert ratio <= 0.15, ratio
    # the quant state must be counted, not only the packed uint8 weight
    packed = sum(lin.weight.numel() for lin in (m.fc1, m.fc2))
    floats = (m.fc1.bias.numel() + m.fc2.bias.numel()) * 4 + weight_bytes(m.norm)
    assert weight_bytes(m) > packed + floats
    assert compute_dtype("qlora") == torch.float32

    x = torch.randn(8, 256, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.float32
    assert rel_err(y, ref(x)) < 0.2
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def forward_train_and_eval(m, x):
    """(train-mode output with grad, the input's gradient, eval-mode output without grad)."""
    x = x.clone().requires_grad_(True)
    y_train = m.train()(x)
    y_train.sum().backward()
    with torch.no_grad():
        y_eval = m.eval()(x.detach())
    return y_train.detach(), x.grad, y_eval


def test_qlora_evaluation_computes_what_training_computes():
    # on a CPU with AVX512-BF16, bitsandbytes' default would take its packed bfloat16 path here
    _, m = pair(128, 256)
    apply_precision(m, "qlora")
    x = torch.randn(8, 128)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    y_train, grad, y_eval = forward_train_and_eval(m, x)
    assert torch.equal(y_eval, y_train)
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved.items())  # the evaluation rewrote nothing
    y_again, grad_again, _ = forward_train_and_eval(m, x)  # training after an evaluation
    assert torch.equal(y_again, y_train) and torch.equal(grad_again, grad)


def test_bitsandbytes_packed_cpu_path_is_the_one_kept_off():
    if not getattr(bnb.functional, "has_avx512bf16", lambda: False)():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no packed CPU path to take here")
    _, m = pair(128, 256)
    apply_precision(m, "qlora")
    x = torch.randn(8, 128)
    forward_train_and_eval(m, x)
    assert not getattr(m.fc1.weight.quant_state, "packing_format_for_cpu", False)
    m.fc1.support_avx512bf16_for_cpu = m.fc2.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    y_train, _, y_eval = forward_train_and_eval(m, x)
    assert m.fc1.weight.quant_state.packing_format_for_cpu  # the packed path was taken...
    assert not torch.equal(y_eval, y_train)  # ...and computes other numbers (in bfloat16)


@pytest.mark.parametrize("precision,width,kept,quantized", [
    ("qlora", 16, 128, bnb.nn.Linear4bit),  # NF4 blocks are 64 values wide
    ("nvfp4", 24, 64, NVFP4Linear),  # NVFP4 needs in_features divisible by 16
])
def test_layers_that_do_not_fit_the_blocks_stay_float32_and_frozen(precision, width, kept, quantized):
    ref, m = pair(width, kept)
    apply_precision(m, precision)
    assert isinstance(m.fc1, FrozenLinear) and isinstance(m.fc2, quantized)
    assert list(m.fc1.parameters()) == [] and m.fc1.weight.dtype == torch.float32
    assert set(unquantized_layers(m)) == {"fc1"} and "block size" in unquantized_layers(m)["fc1"]
    x = torch.randn(8, width)
    assert torch.equal(m.fc1(x), ref.fc1(x))  # unchanged numbers
    _, grad, _ = forward_train_and_eval(m, x)
    assert grad.abs().sum() > 0  # the gradient still reaches the input
    _lora_step(m, x)  # LoRA attaches and is all that trains
    assert isinstance(m.fc1.base_layer, FrozenLinear) and set(unquantized_layers(m)) == {"fc1"}


def test_only_the_kernels_community_notice_of_bitsandbytes_is_dropped(caplog):
    from bitsandbytes.backends.cpu import ops  # the module that logs the notice at import

    with caplog.at_level(logging.WARNING):
        ops.logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                           "you already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        ops.logger.warning("Input type into Linear4bit is torch.float16")
    assert [r.getMessage() for r in caplog.records] == ["Input type into Linear4bit is torch.float16"]


def test_nvfp4_layer():
    ref, m = pair(256, 256)
    apply_precision(m, "nvfp4")
    for lin, rlin in ((m.fc1, ref.fc1), (m.fc2, ref.fc2)):
        assert isinstance(lin, NVFP4Linear) and isinstance(lin, nn.Linear)
        assert list(lin.parameters()) == []  # no trainable float weight
        assert lin.codes.dtype == torch.uint8 and lin.codes.shape == (256, 128)
        assert lin.block_scale.dtype == torch.float8_e4m3fn and lin.block_scale.shape == (256, 16)
        assert lin.global_scale.dtype == torch.float32
        assert lin.weight.dtype == torch.float32 and lin.weight.shape == rlin.weight.shape
        # every dequantized value is an E2M1 value times its block's scale
        scale = (lin.block_scale.float() * lin.global_scale).repeat_interleave(16, dim=1)
        q = lin.weight.abs() / scale
        nearest = E2M1[(q.unsqueeze(-1) - E2M1).abs().argmin(-1)]
        assert torch.allclose(q, nearest, rtol=1e-6, atol=1e-6)
        assert len(torch.unique(nearest)) == 8  # the whole FP4 grid is in use
        assert rel_err(lin.weight, rlin.weight) < 0.2
    ratio = weight_bytes(m) / weight_bytes(ref)
    assert ratio <= 0.15, ratio

    x = torch.randn(8, 256, requires_grad=True)
    y = m(x)
    assert rel_err(y, ref(x)) < 0.2
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_nvfp4_rounds_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 3
    packed, block_scale, global_scale = quantize_nvfp4(w)
    deq = dequantize_nvfp4(packed, block_scale, global_scale)
    scale = (block_scale.float() * global_scale).repeat_interleave(16, dim=1)
    # brute force: the closest signed grid point to w/scale, saturating at 6
    grid = torch.cat([-E2M1.flip(0), E2M1])
    target = (w / scale).clamp(-6, 6)
    best = grid[(target.unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.allclose(deq / scale, best, atol=1e-6)
    # global scale = amax / (6 * 448): the block holding amax gets the top fp8 scale
    assert block_scale.float().max() == 448 and torch.isclose(global_scale, w.abs().max() / (6 * 448))
    # largest element of the tensor is (nearly) exact: the block scale of its block sits at 448 in fp8
    i = w.abs().argmax()
    assert abs(deq.flatten()[i] - w.flatten()[i]) / w.abs().max() < 0.01
    # ties go to the even code: 0.75 -> 1.0, 1.25 -> 1.0, 5 -> 4
    w = torch.zeros(1, 16)
    w[0, :4] = torch.tensor([6.0, 0.75, 1.25, -5.0])
    deq = dequantize_nvfp4(*quantize_nvfp4(w))
    assert deq[0, :4].tolist() == [6.0, 1.0, 1.0, -4.0]
    assert deq[0, 4:].abs().sum() == 0


def test_nvfp4_state_dict_round_trip_and_device_moves():
    torch.manual_seed(0)
    q = NVFP4Linear.from_linear(nn.Linear(64, 32))
    fresh = NVFP4Linear(64, 32, bias=True)
    x = torch.randn(5, 64)
    assert not torch.equal(fresh(x), q(x))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    # a model-wide dtype cast leaves the packed format alone
    q.half()
    assert q.codes.dtype == torch.uint8 and q.block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(q(x), fresh(x))
    assert q(x.half()).dtype == torch.float16
    with pytest.raises(ValueError):
        NVFP4Linear(60, 32)


def _lora_step(m, x):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    peft.inject_adapter_in_model(cfg, m, adapter_name="stack")
    base = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    lora_b = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2
    trainable = [p for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    loss = (m(x) - 1.0).pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in m.named_parameters():
        if n in lora_b:
            assert not torch.equal(p, lora_b[n]), n
    after = m.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else after[k],
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k


def test_peft_lora_on_nvfp4():
    _, m = pair()
    apply_precision(m, "nvfp4")
    _lora_step(m, torch.randn(8, 64))
    assert isinstance(m.fc1.base_layer, NVFP4Linear)
    with pytest.raises(ValueError):
        apply_precision(m, "nvfp4")  # after LoRA the adapters would be quantized too


def test_peft_lora_on_qlora():
    _, m = pair()
    apply_precision(m, "qlora")
    _lora_step(m, torch.randn(8, 64))
    assert type(m.fc1).__module__.startswith("peft.tuners.lora.bnb")
    assert isinstance(m.fc1.base_layer, bnb.nn.Linear4bit)


def test_precision_support_cpu():
    assert precision_support("full", "cpu") is None
    assert precision_support("bfloat16", "cpu") is None
    assert "slow" in precision_support("half", "cpu")
    assert "emulated" in precision_support("nvfp4", "cpu")
    assert precision_support("qlora", "cpu") is not None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            precision_support("half", "cuda")
