"""Plan a run's layout and memory from one process: ``--dry-run --world-size N``.

No process group and no data: the layout (TP/PP/DP, micro-batches per step), the parameters each
rank holds, and the bytes per rank of every model the selection method builds (learner,
reference, proxy) by part (weights, gradients, optimizer state on the device or offloaded to
host memory), plus activations per micro-batch with and without recompute.  What cannot work
is refused with one line (``UserError``), the same checks a real launch makes.

Counts are exact for the GPT that ``model.build_gpt`` builds (tested against the real engines on
gloo ranks); byte figures follow DeepSpeed's allocation:
* ZeRO-1/2: fp32 master partition + Adam's two moments, all sharded over DP (12 bytes / DP per
  parameter); without ZeRO: the same unsharded (fp32: 8 bytes, Adam on the weights themselves).
* gradients: in the weights' dtype, unsharded under ZeRO-0/1, sharded under ZeRO-2, plus ZeRO's
  fp32 gradient partition at the step (an estimate: buckets and fragmentation are not counted).
* activations: Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
  models") per layer, 16-bit: s*b*h*(34 + 5*a*s/h), the TP and sequence-parallel shares as in
  the paper, scaled to the compute dtype; 1F1B keeps up to PP micro-batches in flight on the
  first stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blade_mega.engine.model import ModelSize, padded_vocab_size
from blade_mega.engine.model_engine import check_zero_schedule
from blade_mega.engine.parallel import Layout
from blade_mega.errors import UserError

GIB = 2**30


def microbatches_per_step(config, dp: int) -> int:
    """Batch arithmetic for this layout: micro-batches per step per DP rank."""
    data = config.data
    per_step = data.micro_batch_size * dp
    if data.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {data.global_batch_size} is not divisible by "
                        f"--micro-batch-size {data.micro_batch_size} x data-parallel size {dp}; "
                        f"use a multiple of {per_step}")
    return data.global_batch_size // per_step


def check_model_layout(size: ModelSize, tp: int, pp: int) -> None:
    """What Megatron-Core asserts deep inside model building, as one line naming the flags."""
    heads = size.num_attention_heads
    groups = size.query_groups
    if heads % tp:
        raise UserError(f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                        f"{heads}; use a TP size that divides the heads")
    if groups % tp:
        raise UserError(f"--tensor-model-parallel-size {tp} does not divide --num-query-groups "
                        f"{groups}; use a TP size that divides the query groups")
    if size.ffn_hidden_size % tp:
        raise UserError(f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size "
                        f"{size.ffn_hidden_size}")
    if size.num_layers % pp:
        raise UserError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers "
                        f"{size.num_layers}; use a PP size that divides the layers")


def stage_parameters(size: ModelSize, vocab: int, tp: int, pp: int,
                     divisible_by: int = 128) -> list[int]:
    """Parameters one TP rank of each pipeline stage holds (replicated norms and biases count on
    every TP rank, as they are allocated there); ``divisible_by``: the vocab padding unit."""
    h, f, layers = size.hidden_size, size.ffn_hidden_size, size.num_layers
    heads = size.num_attention_heads
    groups = size.query_groups
    head_dim = h // heads
    bias = size.add_bias_linear
    gated = size.swiglu
    norm = 1 if size.normalization == "RMSNorm" else 2  # weight, bias
    qkv = (heads + 2 * groups) * head_dim // tp
    fc1 = (2 if gated else 1) * f // tp
    per_layer = (norm * h                      # input norm
                 + qkv * h + bias * qkv         # linear_qkv (column parallel)
                 + h * (h // tp) + bias * h     # linear_proj (row parallel; bias replicated)
                 + norm * h                     # pre-MLP norm
                 + fc1 * h + bias * fc1         # linear_fc1
                 + h * (f // tp) + bias * h)    # linear_fc2
    padded = padded_vocab_size(vocab, tp, divisible_by)
    stages = []
    for stage in range(pp):
        count = per_layer * (layers // pp)
        if stage == 0:
            count += padded // tp * h          # word embeddings (rope: no position table)
        if stage == pp - 1:
            count += norm * h + padded // tp * h  # final norm, untied output layer
        stages.append(count)
    return stages


@dataclass
class ModelPlan:
    role: str          # learner, reference, proxy, proxy_reference
    size: ModelSize
    offload: bool
    stages: list[int]  # parameters per rank, by pipeline stage


def model_bytes(params: int, *, dp: int, zero_stage: int, bf16: bool, offload: bool) -> dict:
    """Device (and host) bytes of one rank's share of one model."""
    width = 2 if bf16 else 4
    shard = math.ceil(params / dp)
    if zero_stage == 0:
        optimizer = (4 * params if bf16 else 0) + 8 * params  # fp32 masters (bf16), Adam moments
        gradients = width * params + (4 * params if bf16 else 0)
    else:
        optimizer = 12 * shard                                 # fp32 master + moments, sharded
        gradients = (width * shard if zero_stage >= 2 else width * params) + 4 * shard
    out = {"weights": width * params, "gradients": gradients,
           "optimizer": 0 if offload else optimizer, "optimizer_host": optimizer if offload else 0}
    return out


def activation_bytes(size: ModelSize, config, *, tp: int, pp: int, vocab: int, bf16: bool,
                     micro_batch: int | None = None) -> dict:
    """Activation bytes of one micro-batch (``micro_batch`` samples, by default the run's) on the
    busiest stage, by recompute choice."""
    s, b = config.data.seq_length, micro_batch or config.data.micro_batch_size
    h, a = size.hidden_size, size.num_attention_heads
    layers = size.num_layers // pp
    scale = (2 if bf16 else 4) / 2  # the paper's figures are for 16-bit activations
    sp = config.model.sequence_parallel and tp > 1
    scores = 5 * a * s / (h * tp)                    # attention scores, softmax, dropout mask
    rest = 34 / tp if sp else 10 + 24 / tp
    per_layer = {"none": s * b * h * (rest + scores) * scale,
                 "selective": s * b * h * rest * scale}  # core attention recomputed
    # full: each layer keeps its input only; one layer's activations live during its recompute
    full_input = 2 * s * b * h * scale / (tp if sp else 1)
    padded = padded_vocab_size(vocab, tp, config.model.make_vocab_size_divisible_by)
    logits = 2 * 4 * s * b * padded // tp  # fp32 logits and their gradient
    out = {kind: int(value * layers) for kind, value in per_layer.items()}
    out["full"] = int(full_input * layers + per_layer["none"])
    return {**out, "logits_last_stage": int(logits)}


def small_model_micro_batches(small: ModelSize, config, *, tp: int, pp: int, vocab: int,
                              local_batch: int, local_block: int) -> tuple[int, int]:
    """(training, scoring) micro-batch sizes of a model smaller than the learner (a proxy pair, a
    small reference): the largest multiples of the learner's micro-batch that divide this rank's
    share of the batch (of the candidate block) and whose activations fit in what one learner
    micro-batch already holds, so the run's peak memory is still the learner's.  Scoring is
    forward-only: one layer's activations and the fp32 logits with their log-softmax."""
    def per_sample(size: ModelSize) -> dict:
        return activation_bytes(size, config, tp=tp, pp=pp, vocab=vocab, bf16=config.model.bf16,
                                micro_batch=1)

    recompute = config.model.recompute_granularity or "none"
    learner, proxy = per_sample(config.model.size), per_sample(small)
    micro = config.data.micro_batch_size
    budget = micro * (learner[recompute] + learner["logits_last_stage"])
    train = proxy[recompute] + proxy["logits_last_stage"]
    layers = max(1, small.num_layers // pp)
    score = proxy["none"] / layers + proxy["logits_last_stage"]

    def largest(share: int, per: float) -> int:
        best = micro
        for size in range(micro, share + 1, micro):
            if share % size == 0 and size * per <= budget:
                best = size
        return best

    return largest(local_batch, train), largest(local_block, score)


def plan(config, world_size: int, vocab: int) -> dict:
    """The figures of ``--dry-run`` (a ``RunConfig``) for ``world_size`` ranks; raises UserError
    for what cannot work."""
    parallel = config.parallel
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    zero_stage = parallel.zero_stage
    divisible_by = config.model.make_vocab_size_divisible_by
    layout = Layout.from_world(world_size, tp, pp)
    microbatches = microbatches_per_step(config, layout.dp)
    check_zero_schedule(zero_stage, microbatches)
    size = config.model.size
    check_model_layout(size, tp, pp)
    bf16 = config.model.bf16
    models = []
    for engine in config.method_spec.engines(config, size):
        check_model_layout(engine.size, tp, pp)
        models.append(ModelPlan(engine.role, engine.size, engine.offload,
                                stage_parameters(engine.size, vocab, tp, pp, divisible_by)))
    # The busiest pipeline stage decides what one GPU must hold.
    by_stage = []
    for stage in range(pp):
        parts = {m.role: model_bytes(m.stages[stage], dp=layout.dp, zero_stage=zero_stage,
                                     bf16=bf16, offload=m.offload) for m in models}
        by_stage.append(parts)
    activations = activation_bytes(size, config, tp=tp, pp=pp, vocab=vocab, bf16=bf16)
    recompute = config.model.recompute_granularity or "none"
    in_flight = min(pp, microbatches)

    def device_total(stage: int) -> int:
        models_bytes = sum(v for part in by_stage[stage].values()
                           for k, v in part.items() if k != "optimizer_host")
        acts = activations[recompute] * min(pp - stage, microbatches)
        if stage == pp - 1:
            acts += activations["logits_last_stage"]
        return models_bytes + acts

    busiest = max(range(pp), key=device_total)
    bytes_per_rank = {role: parts for role, parts in by_stage[busiest].items()}
    bytes_per_rank["activations"] = {
        "per_microbatch": {k: activations[k] for k in ("none", "selective", "full")},
        "logits_last_stage": activations["logits_last_stage"],
        "recompute": recompute, "microbatches_in_flight": in_flight}
    bytes_per_rank["total_device"] = device_total(busiest)
    bytes_per_rank["total_host_offload"] = sum(p["optimizer_host"]
                                               for p in by_stage[busiest].values())
    return {
        "world_size": world_size,
        "layout": layout.__dict__,
        "microbatches_per_step": microbatches,
        "zero_stage": zero_stage,
        "dtype": "bf16" if bf16 else "fp32",
        "parameters_total": {m.role: stage_parameters(m.size, vocab, 1, 1, divisible_by)[0]
                             for m in models},
        "parameters_per_rank": {m.role: m.stages for m in models},
        "busiest_stage": busiest,
        "bytes_per_rank": bytes_per_rank,
    }


def describe(p: dict) -> list[str]:
    """The plan as a few lines for people (the JSON line follows them)."""
    lay = p["layout"]
    lines = [f"layout: {p['world_size']} ranks = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}"
             f"; {p['microbatches_per_step']} micro-batches per step per DP rank; "
             f"ZeRO-{p['zero_stage']}, {p['dtype']}"]
    for role, stages in p["parameters_per_rank"].items():
        lines.append(f"{role}: {p['parameters_total'][role] / 1e6:.1f}M parameters, per rank by "
                     f"pipeline stage: {', '.join(f'{n / 1e6:.1f}M' for n in stages)}")
    b = p["bytes_per_rank"]
    lines.append(f"bytes per rank on pipeline stage {p['busiest_stage']} (GiB):")
    for role in p["parameters_per_rank"]:
        part = b[role]
        host = f", optimizer offloaded to host {part['optimizer_host'] / GIB:.2f}" \
            if part["optimizer_host"] else ""
        lines.append(f"  {role}: weights {part['weights'] / GIB:.2f}, gradients "
                     f"{part['gradients'] / GIB:.2f}, optimizer {part['optimizer'] / GIB:.2f}{host}")
    acts = b["activations"]
    per = acts["per_microbatch"]
    lines.append(f"  activations per micro-batch: no recompute {per['none'] / GIB:.2f}, "
                 f"selective {per['selective'] / GIB:.2f}, full {per['full'] / GIB:.2f} "
                 f"(using {acts['recompute']}, {acts['microbatches_in_flight']} in flight); "
                 f"logits {acts['logits_last_stage'] / GIB:.2f} on the last stage")
    lines.append(f"  total on the device: {b['total_device'] / GIB:.2f} GiB"
                 + (f"; host: {b['total_host_offload'] / GIB:.2f} GiB"
                    if b["total_host_offload"] else ""))
    return lines
