"""``--deepspeed-config`` is checked against Megatron's schedule and our flags: a conflicting
value is refused with one line naming the key and the flag, what the file leaves out is merged
in (the reference's offload included), everything else in it is kept."""

import json

import pytest

from blade_mega.engine import ds_config
from blade_mega.config import parse_config
from blade_mega.errors import UserError
from blade_mega.pretrain import main


def args_with(tmp_path, config: dict, *flags: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return parse_config(["--vocab-size", "1000", "--data-path", "x", "--micro-batch-size", "2",
                       "--global-batch-size", "8", "--deepspeed-config", str(path), *flags])


@pytest.mark.parametrize("config, message", [
    ({"gradient_accumulation_steps": 4},
     'gradient_accumulation_steps = 4 conflicts with Megatron\'s pipeline schedule'),
    ({"train_micro_batch_size_per_gpu": 4},
     "train_micro_batch_size_per_gpu = 4 conflicts with --micro-batch-size = 2"),
    ({"train_batch_size": 6}, "train_batch_size = 6 conflicts with --global-batch-size 8"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 conflicts with --zero-stage = 1"),
    ({"bf16": {"enabled": True}}, "bf16.enabled = true conflicts with --fp32 (no --bf16) = false"),
    ({"fp16": {"enabled": True}}, "fp16.enabled conflicts with --fp32"),
    ({"gradient_clipping": 0.5}, "gradient_clipping = 0.5 conflicts with --clip-grad = 1.0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}},
     "optimizer.params.lr = 0.1 conflicts with --lr = 0.001"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' conflicts with --lr/--min-lr"),
], ids=["accumulation", "micro_batch", "train_batch", "zero", "bf16", "fp16", "clip", "lr",
        "scheduler"])
def test_a_conflicting_value_is_refused_naming_key_and_flag(tmp_path, config, message):
    args = args_with(tmp_path, config)
    with pytest.raises(UserError) as err:
        ds_config.for_run(args, dp=2)
    assert message in str(err.value) and str(tmp_path / "ds.json") in str(err.value)
    assert "\n" not in str(err.value)


def test_values_we_set_are_merged_and_the_rest_is_kept(tmp_path):
    user = {"train_batch_size": 8,  # the global batch, as a DeepSpeed user writes it
            "zero_optimization": {"stage": 1, "reduce_bucket_size": 12345},
            "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.99]}},
            "communication_data_type": "fp32"}
    args = args_with(tmp_path, user)
    merged = ds_config.for_run(args, dp=2)
    assert merged["train_batch_size"] == 4  # DeepSpeed sees one micro-batch per DP rank
    assert merged["gradient_accumulation_steps"] == 1
    assert merged["train_micro_batch_size_per_gpu"] == 2
    assert merged["zero_optimization"]["reduce_bucket_size"] == 12345
    assert merged["zero_optimization"]["contiguous_gradients"] is False  # ours, filled in
    assert merged["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert merged["optimizer"]["params"]["weight_decay"] == 0.1
    assert merged["communication_data_type"] == "fp32"
    assert "offload_optimizer" not in merged["zero_optimization"]
    # --reference-offload is no longer lost under a user's file: the reference engine's config
    # gets the host optimizer.
    reference = ds_config.for_run(args, dp=2, offload=True)
    assert reference["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_a_conflict_stops_the_run_before_anything_starts(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(SystemExit) as exit_:
        main(["--vocab-size", "1000", "--data-path", "/nonexistent/x", "--dry-run",
              "--deepspeed-config", str(path)])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: zero_optimization.stage = 2 conflicts with "
                           "--zero-stage = 1")
