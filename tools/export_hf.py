"""Export a checkpoint (any TP/PP layout) as a Hugging Face ``transformers`` model directory.

Examples:
    python tools/export_hf.py --load runs/llama --output hf/llama
    python tools/export_hf.py --load runs/llama/iter_0002000 --output hf/llama-2000 \\
        --tokenizer-model data/tok.model

    # then, with the tools you evaluate with:
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               AutoModelForCausalLM.from_pretrained('hf/llama'); AutoTokenizer.from_pretrained('hf/llama')"

The Llama-style architecture (``--model-size *-llama``, or ``--normalization RMSNorm --swiglu``
with RoPE) becomes ``LlamaForCausalLM`` (config.json, model.safetensors, generation_config.json),
exactly: the same logits on the same tokens. The GPT presets (LayerNorm, GELU, RoPE, one
key/value head per query head) become ``GPTNeoXForCausalLM`` with sequential residuals, as
exactly. Other combinations (learned positions, RMSNorm with GELU, GQA with LayerNorm, ...) are
refused, since no Hugging Face class computes the same function.

Megatron-Core's fused tensors are split into Llama's: linear_qkv holds, per key/value group, its
query heads then one key and one value head; a SwiGLU linear_fc1 holds [gate; up] (per TP
shard in the files, gathered here). RoPE is Megatron's non-interleaved rotary, which is
``rotate_half`` in transformers, so no weight permutation is needed; rope_theta is the run's
--rotary-base.

The output layer and embeddings keep only the tokenizer's rows (Megatron pads the vocabulary to
a multiple of 128 x TP): logits on every real token are ours; ``--keep-padded-vocab`` exports
the padded rows too, so that softmax and losses equal blade-pretrain's to the last digit.

The tokenizer is the run's SentencePiece model as a ``LlamaTokenizer`` (tokenizer.json, its
tokenizer_config.json, and tokenizer.model itself) with no BOS or EOS added: documents were
tokenised that way for training, and the end of a document is ``</s>``. Text round-trips
exactly as through blade_mega.data.tokenizer, except that ``<s>``/``</s>`` typed in text stay text.

Runs as one CPU process, no process group. Everything is written to a temporary directory next to
--output and renamed when complete. Prints one JSON summary line.
"""

import argparse
import json
import os
import shutil
import warnings

import torch

from blade_mega.errors import UserError, run_cli
from blade_mega.train.model_weights import Checkpoint, read_checkpoint


def _require_transformers():
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError:
        raise UserError("tools/export_hf.py needs transformers and safetensors; install them "
                        "with pip install -e '.[hf]'") from None
    return transformers


def hf_class(ckpt: Checkpoint) -> str:
    """The transformers class that computes exactly what the checkpoint's model does."""
    size = ckpt.size
    if size.position_embedding_type == "rope":
        if size.normalization == "RMSNorm" and size.swiglu:
            return "LlamaForCausalLM"
        if size.normalization == "LayerNorm" and not size.swiglu and \
                size.query_groups == size.num_attention_heads:
            return "GPTNeoXForCausalLM"
    differences = [f"--normalization {size.normalization}",
                   "--swiglu" if size.swiglu else "a GELU MLP",
                   f"--position-embedding-type {size.position_embedding_type}"]
    if size.query_groups != size.num_attention_heads:
        differences.append(f"--num-query-groups {size.query_groups}")
    raise UserError(
        f"{ckpt.directory}: {', '.join(differences)} has no exact Hugging Face equivalent "
        "(exported are RMSNorm + SwiGLU + RoPE as LlamaForCausalLM, and LayerNorm + GELU + RoPE "
        "without GQA as GPTNeoXForCausalLM); train with a -llama --model-size for Llama")


def special_token_ids(tokenizer) -> dict:
    """The config's bos/eos/pad ids (none for a --vocab-size run without a tokenizer)."""
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eod_id,
            "pad_token_id": tokenizer.pad_id}


def llama_config(ckpt: Checkpoint, vocab_rows: int, tokenizer, dtype: torch.dtype):
    from transformers import LlamaConfig

    size = ckpt.size
    special = special_token_ids(tokenizer)
    return LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=size.hidden_size,
        intermediate_size=size.ffn_hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.query_groups,
        head_dim=size.hidden_size // size.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=size.max_position_embeddings,
        initializer_range=ckpt.config.model.init_method_std,
        rms_norm_eps=1e-5,  # TransformerConfig.layernorm_epsilon's default
        tie_word_embeddings=False,  # blade-pretrain's embeddings and output layer are separate
        rope_parameters={"rope_type": "default", "rope_theta": float(size.rotary_base)},
        attention_bias=size.add_bias_linear,
        mlp_bias=size.add_bias_linear,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
        **special,
    )


def _norm(state: dict, layer: str, local: str, fused: str) -> torch.Tensor:
    """A layer's norm gain: its own module in the local spec, folded into the next linear layer
    in Transformer Engine's."""
    for name in (f"{layer}.{local}", f"{layer}.{fused}"):
        if name in state:
            return state[name]
    raise UserError(f"checkpoint lacks {layer}.{local} (and {fused}); not a GPTModel checkpoint")


def llama_state_dict(ckpt: Checkpoint, vocab_rows: int) -> dict:
    """Megatron-Core names -> LlamaForCausalLM names, fused tensors split."""
    size, state = ckpt.size, ckpt.state
    heads, groups = size.num_attention_heads, size.query_groups
    head_dim = size.hidden_size // heads
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_rows],
           "model.norm.weight": state["decoder.final_layernorm.weight"],
           "lm_head.weight": state["output_layer.weight"][:vocab_rows]}
    for i in range(size.num_layers):
        layer, hf = f"decoder.layers.{i}", f"model.layers.{i}"
        out[f"{hf}.input_layernorm.weight"] = _norm(
            state, layer, "input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        out[f"{hf}.post_attention_layernorm.weight"] = _norm(
            state, layer, "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        suffixes = ("weight", "bias") if size.add_bias_linear else ("weight",)
        for suffix in suffixes:
            qkv = state[f"{layer}.self_attention.linear_qkv.{suffix}"]
            # [groups * (per_group + 2) * head_dim, ...]: per group its queries, a key, a value
            qkv = qkv.reshape(groups, per_group + 2, head_dim, *qkv.shape[1:])
            rest = qkv.shape[3:]
            out[f"{hf}.self_attn.q_proj.{suffix}"] = qkv[:, :per_group].reshape(-1, *rest)
            out[f"{hf}.self_attn.k_proj.{suffix}"] = qkv[:, per_group].reshape(-1, *rest)
            out[f"{hf}.self_attn.v_proj.{suffix}"] = qkv[:, per_group + 1].reshape(-1, *rest)
            out[f"{hf}.self_attn.o_proj.{suffix}"] = state[
                f"{layer}.self_attention.linear_proj.{suffix}"]
            gate, up = state[f"{layer}.mlp.linear_fc1.{suffix}"].chunk(2, dim=0)
            out[f"{hf}.mlp.gate_proj.{suffix}"] = gate
            out[f"{hf}.mlp.up_proj.{suffix}"] = up
            out[f"{hf}.mlp.down_proj.{suffix}"] = state[f"{layer}.mlp.linear_fc2.{suffix}"]
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def neox_config(ckpt: Checkpoint, vocab_rows: int, tokenizer, dtype: torch.dtype):
    from transformers import GPTNeoXConfig

    size = ckpt.size
    special = special_token_ids(tokenizer)
    return GPTNeoXConfig(
        vocab_size=vocab_rows,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=size.ffn_hidden_size,
        hidden_act="gelu",  # exact (erf) GELU, as Megatron's F.gelu
        max_position_embeddings=size.max_position_embeddings,
        initializer_range=ckpt.config.model.init_method_std,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_parallel_residual=False,  # Megatron's pre-norm layer: attention, then the MLP
        rope_parameters={"rope_type": "default", "rope_theta": float(size.rotary_base),
                         "partial_rotary_factor": 1.0},
        attention_bias=size.add_bias_linear,
        dtype=dtype,
        architectures=["GPTNeoXForCausalLM"],
        **special,
    )


def neox_state_dict(ckpt: Checkpoint, vocab_rows: int) -> dict:
    """Megatron-Core names -> GPTNeoXForCausalLM names. With one group per head, Megatron's
    linear_qkv is per head [q; k; v], which is NeoX's query_key_value layout as it stands."""
    size, state = ckpt.size, ckpt.state
    out = {"gpt_neox.embed_in.weight": state["embedding.word_embeddings.weight"][:vocab_rows],
           "gpt_neox.final_layer_norm.weight": state["decoder.final_layernorm.weight"],
           "gpt_neox.final_layer_norm.bias": state["decoder.final_layernorm.bias"],
           "lm_head.weight": state["output_layer.weight"][:vocab_rows]}
    for i in range(size.num_layers):
        layer, hf = f"decoder.layers.{i}", f"gpt_neox.layers.{i}"
        for suffix in ("weight", "bias"):
            out[f"{hf}.input_layernorm.{suffix}"] = _norm(
                state, layer, f"input_layernorm.{suffix}",
                f"self_attention.linear_qkv.layer_norm_{suffix}")
            out[f"{hf}.post_attention_layernorm.{suffix}"] = _norm(
                state, layer, f"pre_mlp_layernorm.{suffix}", f"mlp.linear_fc1.layer_norm_{suffix}")
        names = {"attention.query_key_value": "self_attention.linear_qkv",
                 "attention.dense": "self_attention.linear_proj",
                 "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2"}
        for theirs, ours in names.items():
            out[f"{hf}.{theirs}.weight"] = state[f"{layer}.{ours}.weight"]
            bias = state.get(f"{layer}.{ours}.bias")
            if bias is not None:
                out[f"{hf}.{theirs}.bias"] = bias
            elif theirs.startswith("mlp."):  # NeoX's MLP always has biases: zero is exact
                rows = out[f"{hf}.{theirs}.weight"].shape[0]
                out[f"{hf}.{theirs}.bias"] = out[f"{hf}.{theirs}.weight"].new_zeros(rows)
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def save_tokenizer(tokenizer, directory: str, max_length: int) -> None:
    """The SentencePiece model as a LlamaTokenizer (transformers converts it to tokenizer.json)."""
    from transformers import AutoTokenizer

    source = os.path.join(directory, ".tokenizer_source")
    os.makedirs(source)
    shutil.copyfile(tokenizer.model_path, os.path.join(source, "tokenizer.model"))
    sp = tokenizer._sp
    config = {
        "tokenizer_class": "LlamaTokenizer",
        # As tools/preprocess_data.py tokenised the training documents: nothing prepended, no
        # dummy prefix space (blade_mega.data.tokenizer trains with add_dummy_prefix=False).
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "legacy": False, "split_special_tokens": True, "clean_up_tokenization_spaces": False,
        "bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eod_id),
        "unk_token": sp.id_to_piece(tokenizer.unk_id), "pad_token": sp.id_to_piece(tokenizer.pad_id),
        "model_max_length": max_length,
    }
    with open(os.path.join(source, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    hf_tokenizer.save_pretrained(directory)
    shutil.move(os.path.join(source, "tokenizer.model"), os.path.join(directory, "tokenizer.model"))
    shutil.rmtree(source)


def _load_tokenizer(path, ckpt: Checkpoint):
    from blade_mega.data.tokenizer import Tokenizer

    path = path or ckpt.config.model.tokenizer_model
    if path is None:
        return None  # a --vocab-size run: no tokenizer to ship
    if not os.path.isfile(path):
        raise UserError(f"{path}: the run's tokenizer model is not there; pass "
                        "--tokenizer-model with the SentencePiece model it was trained with")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != ckpt.vocab_size:
        raise UserError(f"{path}: {tokenizer.vocab_size} tokens, the checkpoint was trained "
                        f"with {ckpt.vocab_size}; pass the run's --tokenizer-model")
    return tokenizer


def _prepare_output(output: str) -> str:
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UserError(f"{output}: already exists and is not empty; choose a new --output or "
                        "remove it")
    parent = os.path.dirname(output)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as err:
        raise UserError(f"cannot write in {parent} ({err.strerror}); choose a writable "
                        "--output") from None
    return tmp


def export(load: str, output: str, tokenizer_model=None, keep_padded_vocab: bool = False,
           trust_checkpoint: bool = False) -> dict:
    transformers = _require_transformers()

    ckpt = read_checkpoint(load, trust_checkpoint)
    architecture = hf_class(ckpt)
    tokenizer = _load_tokenizer(tokenizer_model, ckpt)
    vocab_rows = ckpt.padded_vocab_size if keep_padded_vocab else ckpt.vocab_size
    dtype = ckpt.state["embedding.word_embeddings.weight"].dtype
    if architecture == "LlamaForCausalLM":
        state = llama_state_dict(ckpt, vocab_rows)
        config = llama_config(ckpt, vocab_rows, tokenizer, dtype)
    else:
        state = neox_state_dict(ckpt, vocab_rows)
        config = neox_config(ckpt, vocab_rows, tokenizer, dtype)
    with torch.device("meta"):
        model = getattr(transformers, architecture)(config)
    # strict: every Llama weight comes from the checkpoint, with its exact shape
    model.load_state_dict(state, strict=True, assign=True)
    tmp = _prepare_output(output)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, ckpt.size.max_position_embeddings)
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.replace(tmp, output)
    except OSError as err:
        raise UserError(f"cannot write {output} ({err.strerror}); free space or choose another "
                        "--output") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": os.path.abspath(output), "checkpoint": ckpt.directory,
            "architecture": architecture, "saved_layout": {"tp": ckpt.tp, "pp": ckpt.pp},
            "vocab_size": vocab_rows, "tokenizer_vocab_size": ckpt.vocab_size,
            "parameters": sum(t.numel() for t in state.values()), "dtype": str(dtype),
            "tokenizer": tokenizer is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="a --save directory (its newest complete checkpoint) or one "
                             "iter_XXXXXXX of it")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--tokenizer-model",
                        help="SentencePiece model (default: the run's --tokenizer-model)")
    parser.add_argument("--keep-padded-vocab", action="store_true",
                        help="export Megatron's padded vocabulary rows too")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="may unpickle what a checkpoint never holds, which can run code: "
                             "only for checkpoints you trust, such as one written before "
                             "checkpoint format 2 (also: BLADE_TRUST_CHECKPOINT=1)")
    args = parser.parse_args()
    print(json.dumps(export(args.load, args.output, args.tokenizer_model,
                            args.keep_padded_vocab, args.trust_checkpoint)))
    return 0


if __name__ == "__main__":
    run_cli(main)
