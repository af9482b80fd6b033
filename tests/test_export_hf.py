"""tools/export_hf.py: checkpoints of a TP2 and a PP2 run become LlamaForCausalLM directories
that compute our logits, with a tokenizer AutoTokenizer loads and that tokenises as ours does;
the GPT presets become GPTNeoXForCausalLM; architectures without an exact Hugging Face
equivalent are refused with one line."""

import json
import os

import pytest
import torch

from blade_mega.testing import run_distributed
from conftest import LLAMA_TRAIN, _train_save_and_probe_each, assert_user_error, probe_tokens, run_tool

transformers = pytest.importorskip("transformers")

VOCAB = 2000  # the demo tokenizer's; the runs pad it to 2048


@pytest.fixture(scope="module")
def exported(llama_checkpoints, tmp_path_factory):
    """layout -> the directory export_hf wrote for its checkpoint (and the summary line)."""
    out = {}
    for name, ckpt in llama_checkpoints.items():
        directory = str(tmp_path_factory.mktemp("hf") / name)
        result = run_tool("export_hf", "--load", ckpt.save, "--output", directory)
        assert result.returncode == 0, result.stderr
        out[name] = (directory, json.loads(result.stdout.strip().splitlines()[-1]))
    return out


def hf_logits(directory: str, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"  # the -llama preset's class
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def test_the_checkpoint_gathers_to_exactly_the_trained_model(llama_checkpoints):
    for ckpt in llama_checkpoints.values():
        assert ckpt.rank_reports == [{"differ": [], "missing": []}] * 2


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_exported_logits_equal_ours(llama_checkpoints, exported, layout):
    directory, summary = exported[layout]
    assert summary["saved_layout"] == {"tp": 2, "pp": 1} if layout == "tp2" else \
        {"tp": 1, "pp": 2}
    ours = torch.tensor(llama_checkpoints[layout].logits)
    theirs = hf_logits(directory, probe_tokens())
    assert ours.shape == (2, 32, 2048) and theirs.shape == (2, 32, VOCAB)
    assert (theirs - ours[..., :VOCAB]).abs().max().item() <= 1e-4
    assert ours.std() > 0.1  # a model whose logits say something, not a constant
    config = json.load(open(os.path.join(directory, "config.json")))
    assert (config["num_key_value_heads"], config["tie_word_embeddings"],
            config["rope_parameters"]["rope_theta"], config["vocab_size"]) == \
        (2, False, 10000.0, VOCAB)


def test_keep_padded_vocab_exports_every_row(llama_checkpoints, tmp_path):
    directory = str(tmp_path / "padded")
    result = run_tool("export_hf", "--load", llama_checkpoints["tp2"].save, "--output",
                      directory, "--keep-padded-vocab")
    assert result.returncode == 0, result.stderr
    ours = torch.tensor(llama_checkpoints["tp2"].logits)
    assert (hf_logits(directory, probe_tokens()) - ours).abs().max().item() <= 1e-4


def test_autotokenizer_round_trips_our_tokenizer(exported, demo_data):
    from blade_mega.data.tokenizer import Tokenizer

    ours = Tokenizer.load(demo_data.tokenizer_model)
    theirs = transformers.AutoTokenizer.from_pretrained(exported["tp2"][0], local_files_only=True)
    assert len(theirs) == VOCAB
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == \
        (ours.eod_id, ours.pad_id, ours.bos_id)
    with open(os.path.join(demo_data.corpus_dir, "test.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f][:20]
    texts += ["  two spaces, tabs\t\tand 12345 digits\n\n", "non-ASCII: héllo ✓ 日本語", "<s> x </s>"]
    for text in texts:
        ids = theirs(text)["input_ids"]  # the default call: no BOS, as our datasets
        assert ids == ours.encode(text)
        assert theirs.decode(ids, skip_special_tokens=True) == text


ONE_RANK = {"gpt": ["--model-size", "tiny"],
            "biased_llama": ["--model-size", "tiny", "--normalization", "RMSNorm", "--swiglu"],
            "rms_gelu": ["--model-size", "tiny", "--normalization", "RMSNorm"]}


@pytest.fixture(scope="module")
def one_rank(demo_data, tmp_path_factory) -> dict:
    """name -> (save dir, our logits) of 2-step single-rank runs of other architectures."""
    root = tmp_path_factory.mktemp("one_rank")
    argvs = [["--tokenizer-model", demo_data.tokenizer_model, "--data-path",
              demo_data.pool_prefix, *LLAMA_TRAIN, *flags, "--save", str(root / name)]
             for name, flags in ONE_RANK.items()]
    runs = run_distributed(_train_save_and_probe_each, 1, argvs, timeout=300)[0]
    return {name: (str(root / name), run["logits"]) for name, run in zip(ONE_RANK, runs)}


def test_the_gpt_presets_export_as_gpt_neox(one_rank, tmp_path):
    """LayerNorm + GELU + biases + RoPE: GPTNeoXForCausalLM with sequential residuals."""
    save, ours = one_rank["gpt"]
    directory = str(tmp_path / "hf")
    result = run_tool("export_hf", "--load", save, "--output", directory)
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.use_parallel_residual is False
    with torch.no_grad():
        theirs = model(probe_tokens()).logits
    assert (theirs - torch.tensor(ours)[..., :VOCAB]).abs().max().item() <= 1e-4


def test_an_architecture_without_an_equivalent_is_refused_with_one_line(one_rank, tmp_path):
    save, _ = one_rank["rms_gelu"]
    output = str(tmp_path / "hf")
    result = run_tool("export_hf", "--load", save, "--output", output)
    assert_user_error(result, "--normalization RMSNorm, a GELU MLP, --position-embedding-type "
                      "rope has no exact Hugging Face equivalent", "-llama")
    assert not os.path.exists(output)


def test_an_existing_output_is_not_overwritten(llama_checkpoints, tmp_path):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    result = run_tool("export_hf", "--load", llama_checkpoints["pp2"].save, "--output",
                      str(output))
    assert_user_error(result, "already exists and is not empty")
    assert os.listdir(output) == ["mine.txt"]


def test_biases_map_to_attention_and_mlp_bias(one_rank, tmp_path):
    """RMSNorm + SwiGLU on a preset with biases: Llama with attention_bias and mlp_bias."""
    save, ours = one_rank["biased_llama"]
    directory = str(tmp_path / "hf")
    result = run_tool("export_hf", "--load", save, "--output", directory)
    assert result.returncode == 0, result.stderr
    config = json.load(open(os.path.join(directory, "config.json")))
    assert (config["attention_bias"], config["mlp_bias"]) == (True, True)
    theirs = hf_logits(directory, probe_tokens())
    assert (theirs - torch.tensor(ours)[..., :VOCAB]).abs().max().item() <= 1e-4
