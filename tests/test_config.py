"""blade-pretrain's configuration: ``--config`` YAML under the flags, and ``--dry-run``."""

import json

import pytest

from blade_mega.config import RunConfig, parse_config
from blade_mega.errors import UserError
from conftest import run_main


@pytest.fixture
def base(demo_data) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix]


def test_yaml_values_apply_and_flags_override_them(tmp_path, base):
    config = tmp_path / "run.yaml"
    config.write_text("seq-length: 32\nmicro_batch_size: 2\nlr: 0.005\nselection: highloss\n"
                      "data-path: [a_text_document, b_text_document]\n")
    run = parse_config(["--config", str(config), *base[:2], "--lr", "0.01"])
    assert (run.data.seq_length, run.data.micro_batch_size, run.selection.method) == \
        (32, 2, "highloss")
    assert list(run.data.data_path) == ["a_text_document", "b_text_document"]
    assert run.train.lr == 0.01  # the flag wins over the file


def test_yaml_values_are_validated_like_flags(tmp_path, base):
    config = tmp_path / "run.yaml"
    config.write_text("seq-length: 4096\n")  # above tiny's 256 positions
    with pytest.raises(UserError, match="--seq-length 4096 is above"):
        parse_config(["--config", str(config), *base])
    config.write_text("model-size: huge\n")
    with pytest.raises(UserError, match="model-size: invalid choice: 'huge'"):
        parse_config(["--config", str(config), *base])


@pytest.mark.parametrize("text, problem", [
    ("seq-length: 64.5", "seq-length: invalid int value: '64.5'"),
    ("seq-length: abc", "seq-length: invalid int value: 'abc'"),
    ("lr: fast", "lr: invalid float value: 'fast'"),
    ("selection: bogus", "selection: invalid choice: 'bogus'"),
    ("selection-granularity: [token, sample]", "selection-granularity: expected one value"),
    ("seq-length:", "seq-length: expected one argument"),  # null, as a bare flag
    ("data-path: []", "data-path: expected at least one argument"),
    ("data-path: [[a]]", "data-path: expected a value or a list"),
    ("bf16: 1", "bf16: expected true or false, not 1"),
])
def test_a_bad_yaml_value_is_rejected_like_the_flag_naming_file_and_key(
        tmp_path, base, capsys, text, problem):
    config = tmp_path / "run.yaml"
    config.write_text(text + "\n")
    code, _, err = run_main(["--config", str(config), *base], capsys)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(f"error: {config}: {problem}") and line.endswith("; fix the file")


def test_yaml_values_are_converted_like_flags(tmp_path, base):
    config = tmp_path / "run.yaml"
    config.write_text('seq-length: "64"\nlr: 1e-3\nkeep-ratio: 1\n'  # YAML strings, an int
                      "data-path: [0.3, a_text_document, 0.7, b_text_document]\n")
    run = parse_config(["--config", str(config), *base[:2]])
    assert run.data.seq_length == 64 and type(run.data.seq_length) is int
    keep_ratio = run.selection.keep_ratio
    assert run.train.lr == 0.001 and keep_ratio == 1.0 and type(keep_ratio) is float
    assert list(run.data.data_path) == ["0.3", "a_text_document", "0.7", "b_text_document"]


def test_a_single_yaml_value_for_a_list_flag_is_a_one_item_list(tmp_path, base):
    config = tmp_path / "run.yaml"
    config.write_text("data-path: a_text_document\n")
    assert list(parse_config(["--config", str(config), *base[:2]]).data.data_path) == \
        ["a_text_document"]


@pytest.mark.parametrize("value", [True, False])
def test_yaml_booleans_set_store_true_flags_either_way(tmp_path, base, value):
    config = tmp_path / "run.yaml"
    config.write_text(f"bf16: {str(value).lower()}\nno_progress: {str(value).lower()}\n")
    run = parse_config(["--config", str(config), *base])
    assert (run.model.bf16, run.log.no_progress) == (value, value)
    assert parse_config(["--config", str(config), *base, "--bf16"]).model.bf16  # the flag wins


def test_flags_override_converted_yaml_values(tmp_path, base):
    config = tmp_path / "run.yaml"
    config.write_text('seq-length: "64"\nselection: highloss\ndata-path: [x, y]\n')
    run = parse_config(["--config", str(config), *base, "--seq-length", "32",
                       "--selection", "uniform"])
    assert (run.data.seq_length, run.selection.method) == (32, "uniform")
    assert list(run.data.data_path) == [base[3]]


def test_unknown_yaml_key_is_a_one_line_error(tmp_path, base, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("seq-length: 32\nlearning-rate: 0.1\n")
    code, _, err = run_main(["--config", str(config), *base], capsys)
    assert code == 2
    assert err.splitlines() == [
        f"error: {config}: unknown key 'learning-rate'; use flag names, e.g. micro-batch-size"]


@pytest.mark.parametrize("text, problem", [("[1, 2]\n", "expected a mapping"),
                                           ("a: [\n", "invalid YAML")])
def test_malformed_yaml_is_a_user_error(tmp_path, base, text, problem):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(UserError, match=problem):
        parse_config(["--config", str(config), *base])


def test_dry_run_prints_the_resolved_config_and_layout_without_training(
        tmp_path, base, capsys, monkeypatch):
    # As rank 0 of 8 started by torchrun: the layout comes from the launcher's world size.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    log = tmp_path / "log.jsonl"
    code, out, _ = run_main([*base, "--dry-run", "--tensor-model-parallel-size", "2",
                             "--pipeline-model-parallel-size", "2", "--global-batch-size", "16",
                             "--micro-batch-size", "2", "--seq-length", "64",
                             "--log-file", str(log), "--save", str(tmp_path / "ckpt")], capsys)
    assert code == 0
    resolved = json.loads(out.splitlines()[-1])  # people's lines first, one JSON object last
    assert resolved["layout"] == {"tp": 2, "pp": 2, "dp": 2}
    assert (resolved["launcher"], resolved["world_size"]) == ("torchrun/deepspeed", 8)
    assert resolved["microbatches_per_step"] == 4  # 16 / (2 x dp 2)
    assert resolved["config"]["seq_length"] == 64
    assert resolved["model"]["num_layers"] == 2  # the tiny preset
    assert not log.exists() and not (tmp_path / "ckpt").exists()


def test_dry_run_rejects_a_layout_the_world_cannot_hold(base, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    code, _, err = run_main([*base, "--dry-run", "--tensor-model-parallel-size", "4"], capsys)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("error: world size 6 is not divisible by tensor-model-parallel-size 4")


@pytest.mark.parametrize("learner, extra, expected", [
    ("tiny", [], "same"),              # nothing smaller: the same-size reference
    ("demo", [], "tiny"),              # tiny: 0.15x demo's transformer FLOPs per token
    # 6 x 256 (seq 256): tiny costs 0.030x, demo 0.19x; tiny is nearer 1/16 by ratio
    ("demo", ["--num-layers", "6", "--hidden-size", "256", "--ffn-hidden-size", "1024"], "tiny"),
    ("125m", [], "demo"),              # demo 0.012x, tiny 0.002x
    ("1.3b", ["--seq-length", "2048"], "125m"),  # 350m costs 0.29x: over the quarter
    ("1.3b-llama", ["--seq-length", "2048"], "125m-llama"),  # the learner's family
    ("demo", ["--pipeline-model-parallel-size", "4"], "same"),  # tiny's 2 layers cannot split 4
    ("demo", ["--selection", "rho"], "same"),  # rho has no proxy pair
    ("demo", ["--reference-model", "same"], "same"),  # an explicit choice is kept
])
def test_reference_model_auto_picks_the_preset_nearest_a_sixteenth_of_the_cost(
        demo_data, base, learner, extra, expected):
    run = parse_config([*base, "--target-data-path", demo_data.target_prefix, "--selection",
                       "blade", "--model-size", learner, *extra])
    assert (run.selection.proxy or "same") == expected


@pytest.mark.parametrize("flag", ["--sidecar-half-life", "--redraw-gap"])
def test_forgetting_flags_default_to_off_and_refuse_negative_steps(base, flag):
    data = parse_config(base).data
    assert (data.sidecar_half_life, data.redraw_gap) == (0, 0)  # today's sampler exactly
    dest = flag[2:].replace("-", "_")
    assert getattr(parse_config([*base, flag, "7"]).data, dest) == 7
    with pytest.raises(UserError, match=f"^{flag} -1 must be >= 0 steps"):
        parse_config([*base, flag, "-1"])


def test_a_config_saved_before_the_forgetting_flags_loads_with_them_off(base):
    saved = parse_config(base).to_dict()
    del saved["data"]["sidecar_half_life"], saved["data"]["redraw_gap"]
    data = RunConfig.from_dict(saved).data
    assert (data.sidecar_half_life, data.redraw_gap) == (0, 0)
