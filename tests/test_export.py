"""Export to a transformers model: same logits, same greedy tokens, same token ids; racks
without an exact causal-LM equivalent refused in one line."""

import pytest
import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.checkpoint import save_rack
from stackwise_ray.data import ByteTokenizer
from stackwise_ray.export import export_hf, main
from stackwise_ray.inference import generate

from .conftest import tiny_config


def grown(config, n=3):
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(config)
    for _ in range(n):
        builder.add_stack()
    with torch.no_grad():  # adapters as after training (peft starts B at zero: merging that proves nothing)
        for name, p in builder.build_rack().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return builder


CASES = {
    "append_dual_lora_gqa": dict(model={"n_kv_heads": 1}, qlora_enabled=True, qlora_rank=4, progressive_qlora=True),
    "prepend_nvfp4_untied": dict(model={"tie_embeddings": False}, building_mode="prepend", new_stack_precision="nvfp4",
                                 qlora_enabled=True, qlora_rank=4),
    "qlora_nf4_learned_time": dict(new_stack_precision="qlora", qlora_enabled=True, qlora_rank=4,
                                   time_encoding_type="learned", stack_time_mapping="exponential", time_per_stack=7),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    builder = grown(tiny_config(training_objective="clm", **CASES[request.param]))
    out = tmp_path_factory.mktemp(request.param) / "hf"
    export_hf(builder, str(out))
    return builder, AutoModelForCausalLM.from_pretrained(out).eval(), out


def test_logits_equal_the_racks(exported):
    builder, model, _ = exported
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = builder.build_rack().eval()(x)
        theirs = model(x).logits
    assert model.config.num_hidden_layers == sum(len(s.blocks) for s in builder.build_rack().stacks)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_greedy_generation_gives_the_racks_tokens(exported):
    builder, model, _ = exported
    prompt = list(b"The list ")
    ours = generate(builder, prompt, length=12, temperature=0)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert theirs == ours


def test_tokenizer_gives_the_same_ids(exported):
    from transformers import AutoTokenizer

    _, _, out = exported
    text = "naïve café — def f(x):\n    return x"
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert hf.decode(ByteTokenizer().encode(text)) == text
    assert (hf.pad_token_id, hf.mask_token_id, hf.eos_token_id) == (256, 257, 259)


@pytest.mark.parametrize("settings, reason", [
    (dict(training_objective="mlm"), "bidirectional attention"),
    (dict(training_objective="clm", time_interpretation="input"), "time_interpretation is input"),
])
def test_racks_without_a_causal_lm_equivalent_are_refused_in_one_line(settings, reason, tmp_path, capsys):
    builder = grown(tiny_config(**settings), n=1)
    save_rack(builder, str(tmp_path / "rack"))
    status = main([str(tmp_path / "rack"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert status == 2 and reason in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_command_writes_a_loadable_directory_and_refuses_to_overwrite(tmp_path, capsys):
    builder = grown(tiny_config(training_objective="clm"), n=2)
    save_rack(builder, str(tmp_path / "run" / "final"))
    assert main([str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    capsys.readouterr()
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err


def saved_clm(tmp_path):
    builder = grown(tiny_config(training_objective="clm"), n=1)
    save_rack(builder, str(tmp_path / "run" / "final"))
    return str(tmp_path / "run")


def test_export_deletes_nothing_it_did_not_make_and_replaces_only_when_asked(tmp_path, capsys):
    run = saved_clm(tmp_path)
    (tmp_path / "hf.tmp").mkdir()  # the user's own directory beside OUT
    (tmp_path / "hf.tmp" / "notes.txt").write_text("mine")
    (tmp_path / "hf").mkdir()  # an empty OUT is fine
    assert main([run, str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf.tmp" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp", "run"]  # no temporary left
    capsys.readouterr()
    assert main([run, str(tmp_path / "hf")]) == 2  # holds files now: refused without --force
    assert "already exists and holds files" in capsys.readouterr().err
    (tmp_path / "hf" / "old.txt").write_text("stale")
    assert main([run, str(tmp_path / "hf"), "--force"]) == 0
    assert not (tmp_path / "hf" / "old.txt").exists() and (tmp_path / "hf" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp", "run"]


def test_export_failing_midway_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    import stackwise_ray.export as export

    run = saved_clm(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "hf_tokenizer", lambda tok: type("T", (), {"save_pretrained": full})())
    assert main([run, str(tmp_path / "new" / "hf")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'new' / 'hf'}: cannot write there: No space left on device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the parent made for it is gone too


@pytest.mark.parametrize("out, expected", [("", "error: OUT: must name a new directory, got ''"),
                                           (".", "error: .: must name a new directory, got '.'")])
def test_an_empty_or_dot_out_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, out, expected):
    run = saved_clm(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([run, out]) == 2
    assert capsys.readouterr().err == expected + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_onto_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    run = saved_clm(tmp_path)

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # this machine has no read-only mount to write to
    assert main([run, str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'hf'}: cannot write there: Read-only file system\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_rack_with_weights_that_are_not_finite_is_not_exported(tmp_path, capsys):
    builder = grown(tiny_config(training_objective="clm"), n=1)
    with torch.no_grad():
        builder.build_rack().norm.weight[0] = float("nan")
    save_rack(builder, str(tmp_path / "rack"))
    assert main([str(tmp_path / "rack"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'rack' / 'model.safetensors'}: weights are not finite (NaN or inf in norm.weight)\n"
    assert not (tmp_path / "hf").exists()
