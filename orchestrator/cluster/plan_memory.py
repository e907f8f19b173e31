"""GPU memory per actor, estimated from model shapes and the config (pure arithmetic).

Used by `rlhf plan` (orchestrator/cluster/plan.py). Every figure is bytes per GPU of one actor
(or bytes of CPU RAM for a CPU-only run). The rules, with P parameters:

DeepSpeed learners (policy, critic), ZeRO stage s over N data-parallel ranks (ZeRO paper,
Rajbhandari et al. 2020, mixed-precision Adam):
    weights      2P bytes (bf16/fp16; 4P in float32); / N at stage 3
    gradients    2P (4P in float32); / N at stage >= 2
    optimizer    12P: fp32 master copy + Adam m + v (8P in float32: m + v only); / N at stage >= 1
    offload      moves the optimizer states and the gradient partitions (kept in fp32) to
                 CPU RAM; at stage 3 the weight partitions too (our learners offload both)
    buffers      stage 1-2: reduce + all-gather buckets, 2 x min(5e8, P) elements;
                 stage 3: gathered working set min(1e9, 2 layers) + the LM head (gathered
                 for the whole log-prob pass) + one reduce bucket min(5e8, P)
    activations  rough: tokens t = micro_batch_size x (max_prompt_tokens + max_new_tokens),
                 per layer and token (6H + 2 kv_dim + 4I) values kept for backward (SDPA
                 attention, so no T^2 term); with gradient checkpointing only the layer
                 inputs (H per token and layer) plus one layer recomputed; the policy adds
                 its chunked log-prob head, 3 x 1024 rows x V fp32 (logits, softmax, grad)
Reference: the whole model (zero_stage 0), or 1/N of it under ZeRO-3 (+ the stage-3
    working set; offload moves the partition to CPU RAM); inference activations of one
    micro-batch, t x (4H + 2I) values (one layer's live tensors) + 2 x 1024 x V fp32.
Reward model: the whole model, and inference activations of the whole step's samples at
    once (RewardScorer scores the batch in one forward).
vLLM engine (GPU): the engine claims gpu_memory_utilization x GPU memory; inside it go the
    weights / tensor_parallel_size, the profiling peak of 16384 tokens x (4H + 2I/TP),
    about 1 GiB of CUDA graphs, the runtime, and the KV cache takes the rest. It must hold
    at least one max-length sequence (vLLM refuses to start otherwise); per token
    2 (K, V) x layers x max(1, kv_heads/TP) x head_dim x dtype bytes.
HF engine: weights + KV cache of up to 256 sequences (its generate chunk) + their logits.
Start-up: learners, the reference and the reward model read the whole checkpoint into CPU
    RAM first (`load_cpu`; the node's RAM must hold all of them at once). A ZeRO-3 learner
    then hands the whole module to deepspeed.initialize, which moves it to the GPU before
    partitioning (no zero.Init in LearnerRank), so it needs the whole model on one GPU at
    start-up (`load_gpu`; LEARNER_PARTITIONS_ON_LOAD below). The ZeRO-3 reference
    partitions parameter by parameter (zero.Init(module=...)) and never does.
Runtime: 1.5 GiB per GPU process (CUDA context, NCCL, allocator slack); 1 GiB per CPU
    process (Python, torch, Ray worker).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.orchestrator.cluster.model_catalog import ModelShape

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_RUNTIME = 1.5 * GIB
CPU_RUNTIME = 1.0 * GIB
LOGPROB_CHUNK = 1024          # rows per block of the log-prob kernel (actors' default chunk_size)
VLLM_PROFILE_TOKENS = 16384   # tokens vLLM's start-up profiling pass runs at once
VLLM_CUDA_GRAPHS = 1.0 * GIB
HF_GENERATE_ROWS = 256        # HFRolloutEngine's max_batch_rows default
DS_BUCKET = 5e8               # DeepSpeed reduce_bucket_size / allgather_bucket_size defaults
DS_MAX_LIVE = 1e9             # DeepSpeed stage3_max_live_parameters default
# rlhf.actors.learner.LearnerRank partitions a ZeRO-3 model with zero.Init(module=...) before
# deepspeed.initialize, so the GPU never holds the whole model at start-up.
LEARNER_PARTITIONS_ON_LOAD = True


@dataclass(frozen=True)
class Memory:
    """What one actor needs, per GPU it runs on (CPU run: in RAM)."""

    parts: dict[str, float]          # name -> bytes on the device
    offloaded: float = 0.0           # bytes in CPU RAM (ZeRO-Offload)
    claim: float | None = None       # bytes the actor takes whatever it needs (vLLM)
    load_cpu: float = 0.0            # CPU RAM while loading: the whole checkpoint, before sharding
    load_gpu: float = 0.0            # device bytes at start-up when above `need` (ZeRO-3 learner)
    how: str = ""                    # how the figures were made, one line
    extra: dict[str, float] = field(default_factory=dict)  # figures for the report (e.g. KV sequences)

    @property
    def need(self) -> float:
        """Bytes the actor cannot do without."""
        return sum(self.parts.values())

    @property
    def held(self) -> float:
        """Bytes the actor occupies on its device (vLLM claims its whole budget)."""
        return self.claim if self.claim is not None else self.need


def zero_states(params: int, dtype: str, stage: int, ranks: int, offload: bool) -> dict[str, float]:
    """Bytes per rank of weights, gradients and Adam states, and what offload puts in CPU RAM.

    E.g. 7e9 params, bf16, ZeRO-2 over 4 ranks: weights 14e9, gradients 14e9 / 4 = 3.5e9,
    optimizer 12 x 7e9 / 4 = 21e9."""
    mixed = dtype != "float32"
    w, k = DTYPE_BYTES[dtype], (12 if mixed else 8)
    weights = w * params / (ranks if stage == 3 else 1)
    grads = w * params / (ranks if stage >= 2 else 1)
    optimizer = k * params / (ranks if stage >= 1 else 1)
    cpu = 0.0
    if offload:
        cpu = optimizer + 4 * params / (ranks if stage >= 1 else 1)  # Adam states + fp32 gradient partition
        optimizer, grads = 0.0, 0.0
        if stage == 3:
            cpu, weights = cpu + weights, 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "cpu": cpu}


def zero_buffers(shape: ModelShape, params: int, dtype: str, stage: int, with_head: bool) -> float:
    """DeepSpeed's working buffers per rank (see module docstring)."""
    w = DTYPE_BYTES[dtype]
    if stage in (1, 2):
        return 2 * min(DS_BUCKET, params) * w
    if stage == 3:
        head = shape.vocab * shape.hidden if with_head else 0
        return (min(DS_MAX_LIVE, 2 * shape.layer_params()) + head + min(DS_BUCKET, params)) * w
    return 0.0


def train_activations(shape: ModelShape, tokens: int, dtype: str, checkpointing: bool, lm_head: bool) -> float:
    """Bytes of activations kept for backward of one micro-batch of `tokens` tokens."""
    a = DTYPE_BYTES[dtype]
    per_layer_token = a * (6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate)
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden * a + tokens * per_layer_token
    else:
        kept = shape.layers * tokens * per_layer_token
    head = 3 * min(tokens, LOGPROB_CHUNK) * shape.vocab * 4 if lm_head else 0
    return kept + head


def inference_activations(shape: ModelShape, tokens: int, dtype: str, lm_head: bool) -> float:
    """Peak bytes of a no-grad forward of `tokens` tokens: one layer's live tensors (+ log-prob head)."""
    a = DTYPE_BYTES[dtype]
    head = 2 * min(tokens, LOGPROB_CHUNK) * shape.vocab * 4 if lm_head else 0
    return tokens * (4 * shape.hidden + 2 * shape.intermediate) * a + head


def learner_memory(shape: ModelShape, params: int, dtype: str, stage: int, ranks: int, offload: bool,
                   checkpointing: bool, tokens: int, lm_head: bool, runtime: float) -> Memory:
    """A policy (lm_head=True) or critic rank."""
    states = zero_states(params, dtype, stage, ranks, offload)
    parts = {"weights": states["weights"], "gradients": states["gradients"], "optimizer": states["optimizer"],
             "buffers": zero_buffers(shape, params, dtype, stage, lm_head),
             "activations": train_activations(shape, tokens, dtype, checkpointing, lm_head), "runtime": runtime}
    precision = "fp32 Adam m+v 8 B/param" if dtype == "float32" else f"{dtype} + fp32 master/m/v 12 B/param"
    how = (f"ZeRO-{stage} over {ranks} rank(s), {precision}{', offload to CPU' if offload else ''}; "
           f"activations of {tokens} tokens{' with gradient checkpointing' if checkpointing else ''}")
    w = DTYPE_BYTES[dtype]
    load_gpu = w * params if stage == 3 and not LEARNER_PARTITIONS_ON_LOAD else 0.0
    return Memory(parts, offloaded=states["cpu"], how=how, load_cpu=w * params, load_gpu=load_gpu)


def reference_memory(shape: ModelShape, dtype: str, stage: int, ranks: int, offload: bool, tokens: int,
                     runtime: float) -> Memory:
    """One reference rank: the whole model, or its ZeRO-3 partition."""
    w, params = DTYPE_BYTES[dtype], shape.causal_lm_params()
    weights, cpu, buffers = w * params, 0.0, 0.0
    if stage == 3:
        weights = w * params / ranks
        buffers = (min(DS_MAX_LIVE, 2 * shape.layer_params()) + shape.vocab * shape.hidden) * w
        if offload:
            cpu, weights = weights, 0.0
    parts = {"weights": weights, "buffers": buffers,
             "activations": inference_activations(shape, tokens, dtype, lm_head=True), "runtime": runtime}
    how = (f"{'ZeRO-3 partition over ' + str(ranks) + ' rank(s)' if stage == 3 else 'whole model'}"
           f"{', offloaded to CPU' if offload else ''}; forward of {tokens} tokens")
    return Memory(parts, offloaded=cpu, how=how, load_cpu=w * params)


def reward_memory(shape: ModelShape, dtype: str, tokens: int, runtime: float) -> Memory:
    """The reward model actor: whole model, the whole step's samples in one forward."""
    parts = {"weights": DTYPE_BYTES[dtype] * shape.scalar_head_params(),
             "activations": inference_activations(shape, tokens, dtype, lm_head=False), "runtime": runtime}
    return Memory(parts, how=f"whole model; one forward over the step's {tokens} tokens",
                  load_cpu=parts["weights"])


def kv_bytes_per_token(shape: ModelShape, dtype: str, tp: int) -> float:
    """KV cache bytes per token on one GPU of a tensor-parallel engine."""
    return 2 * shape.layers * max(1, shape.kv_heads // tp) * shape.hd * DTYPE_BYTES[dtype]


def vllm_memory(shape: ModelShape, dtype: str, tp: int, utilization: float, gpu_bytes: float,
                seq_len: int, seqs: int, eager: bool) -> Memory:
    """One GPU of a vLLM engine: it claims utilization x GPU memory; the KV cache gets the rest."""
    w = DTYPE_BYTES[dtype]
    parts = {"weights": w * shape.causal_lm_params() / tp,
             "activations": VLLM_PROFILE_TOKENS * (4 * shape.hidden + 2 * shape.intermediate / tp) * w,
             "cuda graphs": 0.0 if eager else VLLM_CUDA_GRAPHS, "runtime": GPU_RUNTIME}
    per_token = kv_bytes_per_token(shape, dtype, tp)
    budget = utilization * gpu_bytes
    kv = max(0.0, budget - sum(parts.values()))
    parts["kv cache (min)"] = seq_len * per_token  # one max-length sequence, or vLLM refuses
    extra = {"kv_cache": kv, "kv_sequences": kv / (seq_len * per_token), "batch_sequences": seqs}
    how = (f"claims {utilization:g} x {gpu_bytes / GIB:.1f} GiB; KV cache {kv / GIB:.1f} GiB holds "
           f"{int(extra['kv_sequences'])} sequences of {seq_len} tokens; the step sends {seqs} per engine"
           f"{' (vLLM queues the rest: slower, not an error)' if extra['kv_sequences'] < seqs else ''}")
    return Memory(parts, claim=budget, how=how, extra=extra)


def vllm_cpu_memory(shape: ModelShape, dtype: str, kv_cache_gib: int) -> Memory:
    """A vLLM-CPU engine: weights + the fixed KV cache (rollout.kv_cache_gib) + two processes."""
    parts = {"weights": DTYPE_BYTES[dtype] * shape.causal_lm_params(), "kv cache": kv_cache_gib * GIB,
             "runtime": 2 * CPU_RUNTIME}  # the actor and vLLM's engine-core process
    return Memory(parts, how=f"vLLM on CPU, KV cache rollout.kv_cache_gib = {kv_cache_gib} GiB")


def hf_engine_memory(shape: ModelShape, dtype: str, seq_len: int, seqs: int, runtime: float) -> Memory:
    """An HF-generate engine: weights + KV cache and logits of one generate chunk."""
    rows = min(seqs, HF_GENERATE_ROWS)
    parts = {"weights": DTYPE_BYTES[dtype] * shape.causal_lm_params(),
             "kv cache": rows * seq_len * kv_bytes_per_token(shape, dtype, 1),
             "activations": rows * shape.vocab * 4 * 2, "runtime": runtime}
    return Memory(parts, how=f"HF generate, {rows} sequences of {seq_len} tokens at once")
