"""The GPU half of bench/gpu_check.sh: real runs of blade-pretrain on this machine's GPUs.

* 125M preset, bf16 (the CUDA default), uniform selection, 1 GPU: tokens/s, model FLOPs
  utilisation (6N + 12*L*h*s FLOPs per token, the PaLM/Megatron count, against the GPU's dense
  bf16 peak), peak memory (torch.cuda.max_memory_allocated, logged by the run);
* the same with --selection blade: step-time ratio blade / uniform;
* with 2+ GPUs: TP2 and PP2 (2 ranks each) tokens/s.

Data: a small demo corpus built here (stdlib text, BPE vocab 2000). Stages run under one time
budget (``--budget-s``), each with its own timeout; a stage that fails or times out is recorded
and the next one runs; stages that no longer fit the budget are skipped. Every stage's log and
``summary.json`` go under ``$OUT`` when it is set (the device tool returns that folder). Last
line: one JSON object, whatever failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# Dense bf16 peak per GPU (tensor cores, no sparsity), by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "A6000": 155.0,
               "V100": 125.0, "B200": 2250.0, "GH200": 989.0}


def peak_flops(name: str) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def build_data(root: str) -> dict:
    from blade_mega.data.tokenizer import train_tokenizer
    from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
    from blade_mega.prepare.inputs import iter_texts
    from blade_mega.prepare.preprocess import dataset_prefix, preprocess

    corpus = os.path.join(root, "corpus")
    splits, labels = build_demo_corpus(size_mb=4.0, noise_rate=0.5, seed=0)
    write_demo_corpus(corpus, splits, labels)
    tok = train_tokenizer(iter_texts([os.path.join(corpus, "pool.jsonl")], ["text"],
                                     skip_invalid=False), os.path.join(root, "tok"),
                          vocab_size=2000)
    out = {"tokenizer": tok.model_path}
    for split in ("pool", "target"):
        prefix = os.path.join(root, "indexed", split)
        preprocess([os.path.join(corpus, f"{split}.jsonl")], prefix, tok.model_path,
                   append_eod=True, show_progress=False)
        out[split] = dataset_prefix(prefix, "text")
    return out


class Stages:
    """Runs the check's stages under one time budget and records each one's outcome."""

    def __init__(self, budget_s: float, log_dir: str):
        self.deadline = time.monotonic() + budget_s
        self.log_dir = log_dir
        self.results: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn, timeout: float, minimum: float = 30.0):
        """``fn(timeout)``'s result under ``name``; an exception becomes ``{"error": ...}``; a
        stage with under ``minimum`` seconds of budget left is skipped. Returns the result."""
        timeout = min(timeout, self.left())
        if timeout < minimum:
            result = {"skipped": f"time budget: {max(0.0, self.left()):.0f} s left"}
        else:
            started = time.monotonic()
            try:
                result = fn(timeout)
            except subprocess.TimeoutExpired as err:
                result = {"error": f"timed out after {err.timeout:.0f} s"}
            except Exception as err:  # noqa: BLE001 - recorded; the next stage still runs
                result = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
            if isinstance(result, dict):
                result.setdefault("seconds", round(time.monotonic() - started, 1))
        self.results[name] = result
        return result


def run_logged(cmd: list[str], log_path: str, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` with its stdout and stderr in ``log_path`` (all of it, for the failure's cause);
    TimeoutExpired after ``timeout`` seconds, the process killed."""
    with open(log_path, "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)


def last_line(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def run(data: dict, ranks: int, flags: list[str], steps: int, root: str, name: str,
        log_dir: str, timeout: float = 300) -> dict:
    log = os.path.join(root, f"{name}.jsonl")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(29400 + ranks),
           "-m", "blade_mega.pretrain", "--model-size", "125m", "--seq-length", "1024",
           "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", str(steps),
           "--lr-warmup-iters", "2", "--log-interval", "5", "--eval-interval", "0",
           "--no-progress", "--tokenizer-model", data["tokenizer"], "--data-path", data["pool"],
           "--target-data-path", data["target"], "--log-file", log, *flags]
    started = time.time()
    output = os.path.join(log_dir, f"{name}.log")
    result = run_logged(cmd, output, timeout)
    if result.returncode:
        return {"error": last_line(output), "log": output, "seconds": time.time() - started}
    records = [json.loads(line) for line in open(log)]
    train = [r for r in records if r["kind"] == "train"][1:]  # the first window warms up
    step_time = sum(r["step_time"] for r in train) / len(train)
    return {"tokens_per_s": 16 * 1024 / step_time, "step_time_s": step_time,
            "loss_last": train[-1]["loss"],
            "peak_memory_gib": max(r.get("gpu_memory_peak_gib", 0.0) for r in train),
            "device_path": records[0].get("device_path"), "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-tests-rc", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=400,
                        help="time for all stages together; later stages are skipped when short")
    args = parser.parse_args()
    import torch

    from blade_mega.engine.model import PRESETS, count_parameters

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with NVIDIA GPUs",
              file=sys.stderr)
        sys.exit(1)
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    out = {"gpu": name, "gpus": gpus, "torch": torch.__version__,
           "cuda_tests": None if args.cuda_tests_rc is None else
           ("passed" if args.cuda_tests_rc == 0 else f"failed (rc {args.cuda_tests_rc})")}
    log_dir = os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_logs_")
    os.makedirs(log_dir, exist_ok=True)
    stages = Stages(args.budget_s, log_dir)
    with tempfile.TemporaryDirectory() as root:
        data = stages.run("data", lambda timeout: build_data(root), timeout=120)
        if "error" not in data and "skipped" not in data:
            size = PRESETS["125m"]
            flops_per_token = 6 * count_parameters(size, 2048) + 12 * size.num_layers * \
                size.hidden_size * 1024
            peak = peak_flops(name)

            def stage(label, ranks, flags):
                return stages.run(label, lambda timeout: run(
                    data, ranks, flags, args.steps, root, label, log_dir, timeout), timeout=300)

            uniform = stage("uniform_125m_bf16", 1, [])
            if "tokens_per_s" in uniform and peak:
                out["mfu"] = uniform["tokens_per_s"] * flops_per_token / peak
            blade = stage("blade_125m_bf16", 1, ["--selection", "blade",
                                                 "--blade-sync-interval", "10"])
            if "step_time_s" in uniform and "step_time_s" in blade:
                out["blade_over_uniform_step_time"] = \
                    blade["step_time_s"] / uniform["step_time_s"]
            if gpus >= 2:
                stage("tp2", 2, ["--tensor-model-parallel-size", "2"])
                stage("pp2", 2, ["--pipeline-model-parallel-size", "2"])
    out.update(stages.results)
    out["logs"] = log_dir
    with open(os.path.join(log_dir, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
