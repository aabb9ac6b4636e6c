"""python -m stackwise_ray.export RUN_DIR OUT --format hf

Write a trained rack as a Hugging Face `transformers` model directory (Llama architecture:
config.json, model.safetensors, tokenizer files) that `AutoModelForCausalLM.from_pretrained(OUT)`
loads and that computes the rack's logits.

The mapping is exact, not approximate:
- every projection becomes one float32 weight: 4-bit (NF4, NVFP4) base weights are
  dequantized and every active LoRA adapter (stack and trunk) is merged into it;
- rotary embeddings: the rack rotates channel pairs (2i, 2i+1), Llama rotates (i, i+hs/2),
  so the rows of q_proj and k_proj are permuted within each head (q.k is unchanged);
- the per-stack time embedding of depth mode is a constant vector added to the residual
  stream where the stack starts; for the first stack it is folded into the token
  embedding (the head then keeps its own copy of the original embedding), for a later
  stack into the down_proj bias of the block just before it (`mlp_bias`; the other MLP
  biases are zero).
Racks that have no exact causal-LM equivalent are refused: bidirectional attention (mlm)
and time given as input per example.
Stacks stored in half or bfloat16 compute in that dtype inside the rack; the export is
float32, so their logits agree up to that rounding.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

from . import storage
from .adapters import lora_layers
from .checkpoint import WEIGHTS, finite_weights_problem
from .cli import OneLineParser, refuse
from .errors import first_line


class ExportError(ValueError):
    """The rack cannot be written in the requested format; the message says why."""


def _base_weight(layer) -> torch.Tensor:
    """The float32 weight a (possibly 4-bit) linear layer multiplies by."""
    if type(layer).__module__.startswith("bitsandbytes"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if hasattr(layer, "dequantize"):  # NVFP4Linear
        return layer.dequantize().float()
    return layer.weight.detach().float()


def merged_weight(module) -> torch.Tensor:
    """The float32 weight of a projection with its active LoRA adapters merged in."""
    if not lora_layers(module):
        return _base_weight(module)
    weight = _base_weight(module.base_layer).clone()
    for name in module.active_adapters:
        weight += module.get_delta_weight(name).float()
    return weight


def _rope_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns the rack's interleaved rotary pairs into Llama's half split."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return torch.cat([h * head_dim + within for h in range(n_heads)])


@torch.no_grad()
def time_vectors(rack) -> list[torch.Tensor]:
    """Per rack position, the depth-time vector its stack adds to the residual stream, as
    the stack computes it (in its compute dtype), returned in float32."""
    out = []
    for stack in rack.stacks:
        t = torch.tensor([stack.time_step])
        out.append(stack.time(t)[0].to(stack.compute_dtype).float())
    return out


def check_exportable(config) -> None:
    p = config.training.progressive
    if not config.causal:
        raise ExportError("the rack uses bidirectional attention (training_objective "
                          f"{p.training_objective}): a causal LM cannot compute it")
    if p.time_interpretation == "input":
        raise ExportError("time_interpretation is input: the rack takes a time step per example, "
                          "which a causal LM has no input for")


@torch.no_grad()
def to_llama(builder):
    """(LlamaConfig, state dict) computing the same logits as `builder`'s rack."""
    from transformers import LlamaConfig

    config, rack = builder.config, builder.build_rack().eval()
    check_exportable(config)
    m = config.model
    blocks = [block for stack in rack.stacks for block in stack.blocks]
    first = blocks[0]
    n_heads, n_kv = first.attn.n_heads, first.attn.n_kv_heads
    head_dim = first.attn.head_dim
    d_ff = first.mlp.gate_proj.out_features
    vectors = time_vectors(rack)
    embed = rack.embed.weight.detach().float()
    state = {"model.embed_tokens.weight": embed + vectors[0], "lm_head.weight": rack.head.weight.detach().float().clone(),
             "model.norm.weight": rack.norm.weight.detach().float()}
    q_rows, k_rows = _rope_permutation(n_heads, head_dim), _rope_permutation(n_kv, head_dim)
    # the block after which each later stack starts: its down_proj bias adds that stack's time vector
    starts, i = {}, 0
    for pos, stack in enumerate(rack.stacks):
        if pos > 0:
            starts[i - 1] = vectors[pos]
        i += len(stack.blocks)
    for i, block in enumerate(blocks):
        pre = f"model.layers.{i}."
        state[pre + "input_layernorm.weight"] = block.attn_norm.weight.detach().float()
        state[pre + "post_attention_layernorm.weight"] = block.mlp_norm.weight.detach().float()
        state[pre + "self_attn.q_proj.weight"] = merged_weight(block.attn.q_proj)[q_rows]
        state[pre + "self_attn.k_proj.weight"] = merged_weight(block.attn.k_proj)[k_rows]
        state[pre + "self_attn.v_proj.weight"] = merged_weight(block.attn.v_proj)
        state[pre + "self_attn.o_proj.weight"] = merged_weight(block.attn.o_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[pre + f"mlp.{name}.weight"] = merged_weight(getattr(block.mlp, name))
            out = state[pre + f"mlp.{name}.weight"].shape[0]
            state[pre + f"mlp.{name}.bias"] = starts[i] if name == "down_proj" and i in starts else torch.zeros(out)
    tok = builder_tokenizer(builder)
    llama = LlamaConfig(
        vocab_size=embed.shape[0], hidden_size=embed.shape[1], intermediate_size=d_ff,
        num_hidden_layers=len(blocks), num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
        attention_bias=False, mlp_bias=True, tie_word_embeddings=False, hidden_act="silu",
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, torch_dtype="float32")
    return llama, {k: v.contiguous() for k, v in state.items()}


def builder_tokenizer(builder):
    from .data.tokenizer import load_tokenizer

    return load_tokenizer(builder.config.data.tokenizer)


def hf_tokenizer(tokenizer):
    """A transformers tokenizer with the same ids: the byte tokenizer as a byte-level BPE
    without merges (byte b is id b), or the run's own tokenizers file."""
    from transformers import PreTrainedTokenizerFast

    from .data.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = ByteLevel.alphabet()  # one printable character per byte, GPT-2's mapping
        byte_char = _bytes_to_unicode()
        assert set(byte_char.values()) == set(alphabet)
        vocab = {byte_char[b]: b for b in range(256)}
        names = {tokenizer.pad_id: "<pad>", tokenizer.mask_id: "<mask>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
        vocab.update({name: i for i, name in names.items()})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(names.values()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_file=tokenizer.path)
        names = {i: fast.convert_ids_to_tokens(i) for i in (tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id,
                                                             tokenizer.eos_id)}
    fast.pad_token, fast.mask_token = names[tokenizer.pad_id], names[tokenizer.mask_id]
    fast.bos_token, fast.eos_token = names[tokenizer.bos_id], names[tokenizer.eos_id]
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def export_hf(builder, out: str) -> str:
    """Write `builder`'s rack to the directory `out`: made under a fresh name beside it, then
    renamed into place (replacing what is there: the command checks first, out_problem). On
    failure nothing is left: the partial directory and the parents made for it are removed."""
    from transformers import GenerationConfig, LlamaForCausalLM

    llama_config, state = to_llama(builder)
    tokenizer = builder_tokenizer(builder)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = LlamaForCausalLM(llama_config)
    model.load_state_dict(state, strict=True, assign=True)
    special = sorted(tokenizer.special_ids)
    # the rack's own sampling never emits its special ids (sample.py); generate() does the same
    model.generation_config = GenerationConfig(suppress_tokens=special, pad_token_id=tokenizer.pad_id,
                                               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    out = os.path.abspath(out)
    made = storage.missing_dirs(os.path.dirname(out))  # deepest first
    os.makedirs(os.path.dirname(out), exist_ok=True)
    stage = None
    try:
        stage = storage.fresh_dir_beside(out)
        model.save_pretrained(stage, safe_serialization=True)
        hf_tokenizer(tokenizer).save_pretrained(stage)
        os.chmod(stage, 0o755)  # mkdtemp's 0700
        storage.replace_dir(stage, out)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        storage.remove_made_dirs(made)
        raise
    return out


def out_problem(out: str, force: bool) -> str | None:
    """Why OUT cannot be written, or None: it must name a directory; one that exists must
    be empty unless --force (a file, a link or a directory with files is then replaced)."""
    if os.path.basename(out.rstrip("/")) in ("", ".", ".."):
        return f"must name a new directory, got {out!r}"
    if not os.path.lexists(out) or force:
        return None
    if os.path.islink(out) or not os.path.isdir(out):
        return f"already exists ({'a symbolic link' if os.path.islink(out) else 'a file'}); choose a new directory " \
               "or pass --force to replace it"
    if os.listdir(out):
        return "already exists and holds files; choose a new directory or pass --force to replace it"
    return None


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.export", description=__doc__.splitlines()[2])
    parser.add_argument("run_dir", help="a run directory (its final/ rack) or a checkpoint directory")
    parser.add_argument("out", help="directory to write (new, or empty)")
    parser.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers model directory")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    args = parser.parse_args(argv)
    from .sample import resolve

    if problem := out_problem(args.out, args.force):
        return refuse(args.out or "OUT", problem)
    try:
        path = resolve(args.run_dir)
        from .checkpoint import load_rack

        builder = load_rack(path)
        check_exportable(builder.config)
        if problem := finite_weights_problem(builder.rack):
            raise ExportError(f"{storage.join(path, WEIGHTS)}: {problem}")
    except (ExportError, OSError, ValueError) as e:  # OSError: a run directory that cannot be read
        msg = first_line(e) or type(e).__name__
        return refuse(args.run_dir, msg)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per shard would make an error line one of several
    try:
        export_hf(builder, args.out)
    except OSError as e:  # a read-only or full destination: nothing was left there
        return refuse(args.out, f"cannot write there: {e.strerror or e}")
    print(f"transformers model: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
