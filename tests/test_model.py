import torch

from stackwise_ray.model import Rack, Stack


def make_rack(n_stacks=2, causal=False, n_kv_heads=2, time_interpretation="depth", encoding="sinusoidal", tie=True):
    rack = Rack(vocab_size=50, d_model=32, max_seq_len=24, n_heads=4, pad_id=0, tie_embeddings=tie,
                time_interpretation=time_interpretation)
    for k in range(n_stacks):
        rack.stacks.append(Stack(k, 1, 32, 4, n_kv_heads, 64, causal, 1e-5, encoding, 16, 100, time_step=10 * k))
    return rack.eval()


def test_padding_does_not_change_real_positions():
    rack = make_rack()
    ids = torch.randint(1, 50, (1, 10))
    short = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1)
    long = torch.cat([ids, torch.zeros(1, 14, dtype=torch.long)], 1)
    a, _ = rack(short)
    b, _ = rack(long)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    rack.pad_id = -1  # a pad-blind model sees the extra pads: the mask is what keeps them out
    c, _ = rack(long)
    assert not torch.allclose(a[:, :10], c[:, :10], atol=1e-4)


def test_causal_attention_ignores_the_future_and_bidirectional_does_not():
    ids = torch.randint(1, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] % 49) + 1
    causal, bidir = make_rack(causal=True), make_rack(causal=False)
    torch.testing.assert_close(causal(ids)[0][:, :8], causal(changed)[0][:, :8])
    assert not torch.allclose(bidir(ids)[0][:, :8], bidir(changed)[0][:, :8])


def test_grouped_kv_heads_have_fewer_key_weights():
    rack = make_rack(n_kv_heads=1)
    attn = rack.stacks[0].blocks[0].attn
    assert attn.k_proj.weight.shape == (8, 32) and attn.q_proj.weight.shape == (32, 32)
    logits, _ = rack(torch.randint(1, 50, (2, 12)))
    assert logits.shape == (2, 12, 50) and torch.isfinite(logits).all()


def test_time_conditioning_changes_the_output():
    for encoding in ("sinusoidal", "learned"):
        rack = make_rack(time_interpretation="input", encoding=encoding)
        ids = torch.randint(1, 50, (2, 12))
        a, _ = rack(ids, time_steps=torch.tensor([0, 0]))
        b, _ = rack(ids, time_steps=torch.tensor([50, 0]))
        assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_depth_time_uses_each_stacks_own_step():
    rack = make_rack(time_interpretation="depth")
    ids = torch.randint(1, 50, (1, 12))
    a, _ = rack(ids, time_steps=torch.tensor([0]))
    b, _ = rack(ids, time_steps=torch.tensor([99]))  # ignored in depth mode
    torch.testing.assert_close(a, b)
    rack.stacks[1].time_step = 55
    c, _ = rack(ids)
    assert not torch.allclose(a, c)


def test_head_is_tied_and_cached_entry_matches_full_forward():
    rack = make_rack(n_stacks=3)
    assert rack.head.weight is rack.embed.weight
    assert make_rack(tie=False).head.weight is not make_rack(tie=False).embed.weight
    ids = torch.randint(1, 50, (2, 12))
    full, _ = rack(ids)
    trunk_out = rack.run_stacks(rack.embed_tokens(ids), ids, end=2)
    resumed, _ = rack(ids, hidden=trunk_out, start=2)
    torch.testing.assert_close(full, resumed)


def test_loss_uses_only_masked_positions():
    rack = make_rack()
    ids = torch.randint(1, 50, (2, 12))
    targets = ids.clone()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3] = True
    logits, loss = rack(ids, targets=targets, loss_mask=mask)
    expected = torch.nn.functional.cross_entropy(logits[:, 3], targets[:, 3])
    torch.testing.assert_close(loss, expected)
