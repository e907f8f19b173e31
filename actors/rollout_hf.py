"""The rollout role without vLLM: Hugging Face `generate` behind `RolloutEngine`'s interface.

For machines where vLLM is missing or slower (on two CPU cores with a tiny model HF
`generate` is faster, see bench/rollout.py). Selected with `rollout.backend: hf`; the
launcher, `RolloutGroup` and every weight-sync route call the same methods as on
`rlhf.actors.rollout.RolloutEngine`, and get the same results' layout:

- `generate(prompt_ids, prompt_index, n, temperature, top_p, max_new_tokens, seed) -> Samples`:
  the log-prob of each sampled token is of the distribution it was drawn from,
  log_softmax(logits / T) (renormalised over the nucleus when top_p < 1), i.e. vLLM's
  `processed_logprobs`, which is what the learner computes. `finished[i]` is True iff the
  sample ended on a stop token (the generation config's eos ids plus the tokenizer's eos),
  which is then its last id.
- Seeds: sample j of prompt `prompt_index[i]` draws from its own generator seeded
  `seed + n * prompt_index[i] + j` (as vLLM seeds it), so a sample does not depend on
  which engine, chunk or batch served it (the samples themselves differ from vLLM's:
  another sampler). `seed=None`: per-sample seeds drawn from the engine's own seeded RNG.
- Weights: `load_weight_buckets` (object_store route), `init_weight_group` +
  `receive_weights` (gloo route), `load_ipc_handles` (cuda_ipc, GPU), `weights_checksum`.
  nccl is not offered: the weight group's NCCL side is vLLM's communicator.

Run on one CPU machine (starts in about a second):

    engine = ray.remote(num_cpus=1)(HFRolloutEngine).remote(model_path, dtype="float32")
    samples = ray.get(engine.generate.remote(prompt_ids, list(range(len(prompt_ids))), 4), timeout=600)

On a cluster the same, with `num_gpus=1` on the actor (the model goes to that GPU).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from rlhf.actors.weights import BucketMeta, NamedTensors, WeightGroup, bucket_from_bytes, unflatten_bucket
from rlhf.orchestrator.experience import Samples


class SeededSampler:
    """A `generate` logits processor that samples each row from its own pre-drawn uniforms.

    Why not `do_sample=True`: HF samples every row from one global RNG, so a row's tokens
    would depend on the rest of the batch. Here row b holds `uniforms[b]` (one per step,
    drawn from its own seeded generator), samples by inverse CDF of softmax(logits / T)
    (nucleus-renormalised), records that distribution's log-prob of the chosen token, and
    returns scores that make `generate`'s greedy step pick exactly that token.
    """

    def __init__(self, uniforms: Tensor, temperature: float, top_p: float) -> None:
        self.uniforms = uniforms  # [B, max_new_tokens] float64 in [0, 1)
        self.temperature, self.top_p = temperature, top_p
        self.logprobs: list[Tensor] = []  # per step: [B] log-prob of the chosen token

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            logp = _nucleus(logp, self.top_p)
        cdf = logp.double().exp().cumsum(-1)
        u = self.uniforms[:, len(self.logprobs)].to(cdf.device)[:, None]
        # right=True: the first token whose cumulative mass exceeds u * total, so a token
        # of zero probability (outside the nucleus) is never chosen.
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        self.logprobs.append(logp.gather(-1, tokens)[:, 0])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tokens, 0.0)


class StopStrings(StoppingCriteria):
    """Ends row b once its generated text holds one of `stops[b]` (vLLM's stop strings: searched
    in the text generated after the `width` context columns), or at `max_tokens[b]` tokens.
    `stopped_at[b]`: how many tokens the row had when its stop string completed (else None).

    Checked after every token, so a stop string first appears in the latest token; only the
    last few tokens (enough to spell the longest stop string) are decoded each step.
    """

    def __init__(self, tokenizer, width: int, stops: list[list[str]], max_tokens: list[int]) -> None:
        self.tokenizer, self.width, self.stops, self.max_tokens = tokenizer, width, stops, max_tokens
        self.windows = [max((len(s) for s in row), default=0) + 1 for row in stops]
        self.stopped_at: list[int | None] = [None] * len(stops)
        self.done = [False] * len(stops)

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        length = input_ids.shape[1]
        step = length - self.width
        for b, row in enumerate(self.stops):
            if self.done[b]:
                continue
            if row:
                window = input_ids[b, max(self.width, length - self.windows[b]):].tolist()
                text = self.tokenizer.decode(window, skip_special_tokens=True)
                if any(s in text for s in row):
                    self.stopped_at[b], self.done[b] = step, True
            self.done[b] = self.done[b] or step >= self.max_tokens[b]
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _nucleus(logp: Tensor, top_p: float) -> Tensor:
    """Log-probs renormalised over the smallest set of tokens holding `top_p` of the mass."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p  # the top token always stays (mass before it is 0)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


class HFRolloutEngine:
    """One transformers model that samples with `generate` and takes in new policy weights."""

    def __init__(self, model_path: str, dtype: str = "auto", max_model_len: int = 2048, seed: int = 0,
                 kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False, rpc_timeout_s: float = 300.0, max_batch_rows: int = 256,
                 num_threads: int | None = None, tools: dict | None = None) -> None:
        """Same arguments as `RolloutEngine`, so the launcher builds either; `kv_cache_gib`,
        `gpu_memory_utilization` and `enforce_eager` are vLLM's and ignored here.
        `max_batch_rows`: samples per `generate` call (bounds the KV cache);
        `num_threads`: torch threads (None keeps the process's setting, e.g. Ray's);
        `tools`: launch.tool_spec(cfg) (None: no tools), as on `RolloutEngine`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if tensor_parallel_size != 1:
            raise ValueError(f"the hf rollout backend runs one device per engine; tensor_parallel_size "
                             f"must be 1, got {tensor_parallel_size}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.max_model_len, self.rpc_timeout_s, self.max_batch_rows = max_model_len, rpc_timeout_s, max_batch_rows
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype).to(self.device).eval()
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.tools = None
        if tools:
            from rlhf.actors.tools import build_tools

            self.tools = build_tools(tools)
        try:
            saved = GenerationConfig.from_pretrained(str(model_path))
        except OSError:  # no generation_config.json
            saved = GenerationConfig.from_model_config(self.model.config)
        self.stop_ids = sorted(set(_as_list(saved.eos_token_id)) | set(_as_list(tokenizer.eos_token_id)))
        self.pad_id = next(i for i in (tokenizer.pad_token_id, self.model.config.pad_token_id, self.stop_ids[0])
                           if i is not None)
        # A fresh generation config: a checkpoint's own defaults (repetition penalty, top_k,
        # ...) would otherwise act on the logits before our sampler and change log-probs.
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        self._rng = torch.Generator().manual_seed(seed)  # seeds of unseeded requests
        self._params = dict(self.model.named_parameters(remove_duplicate=False))  # tied head under both names
        self._checksums: dict[str, float] = {}
        self._group: WeightGroup | None = None

    # ---- sampling ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], prompt_index: list[int], n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 seed: int | None = None) -> Samples:
        """`n` samples per prompt, the n of one prompt consecutive, prompts in the given order
        (the contract of `RolloutEngine.generate`, seeds and tools included)."""
        if len(prompt_ids) != len(prompt_index):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(prompt_index)} prompt indices")
        if self.tools is not None:
            from rlhf.actors.tools import check_lengths, generate_with_tools

            check_lengths(prompt_ids, max_new_tokens, self.tools, self.max_model_len)
            segment_fn = functools.partial(self._segments, temperature=temperature, top_p=top_p)
            return generate_with_tools(segment_fn, self.tokenizer, self.tools, prompt_ids, prompt_index, n,
                                       max_new_tokens, seed)
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"max_model_len {self.max_model_len}")
        rows = [(list(p), idx, j) for p, idx in zip(prompt_ids, prompt_index) for j in range(n)]
        samples = Samples([], [], [], [], [])
        for start in range(0, len(rows), self.max_batch_rows):
            part = rows[start:start + self.max_batch_rows]
            seeds = [self._fresh_seed() if seed is None else seed + n * idx + j for _, idx, j in part]
            ids, logps = self._generate_rows([p for p, _, _ in part], seeds, temperature, top_p, max_new_tokens)
            for (prompt, idx, _), tokens, lp in zip(part, ids, logps):
                stop = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
                cut = len(tokens) if stop is None else stop + 1
                samples.prompt_ids.append(prompt)
                samples.response_ids.append(tokens[:cut])
                samples.response_logprobs.append(lp[:cut])
                samples.finished.append(stop is not None)
                samples.prompt_index.append(idx)
        return samples

    def _segments(self, contexts: list[list[int]], seeds: list[int | None], max_tokens: list[int],
                  stop_strings: list[list[str]], temperature: float, top_p: float) -> list:
        """The tool loop's primitive: each context generates until its stop strings (the token
        that completes one is kept, as vLLM's include_stop_str_in_output), an eos id or `max_tokens`."""
        from rlhf.actors.tools import Segment

        segments = []
        for start in range(0, len(contexts), self.max_batch_rows):
            part = slice(start, start + self.max_batch_rows)
            width = max(len(c) for c in contexts[part])
            stop = StopStrings(self.tokenizer, width, stop_strings[part], max_tokens[part])
            row_seeds = [self._fresh_seed() if s is None else s for s in seeds[part]]
            ids, logps = self._generate_rows(contexts[part], row_seeds, temperature, top_p, max(max_tokens[part]),
                                             stop)
            for tokens, lp, limit, at in zip(ids, logps, max_tokens[part], stop.stopped_at):
                eos = next((k + 1 for k, t in enumerate(tokens[:limit]) if t in self.stop_ids), None)
                cut = min(c for c in (eos, at, limit) if c is not None)
                segments.append(Segment(tokens[:cut], lp[:cut], at == cut and eos != cut, eos == cut))
        return segments

    @torch.no_grad()
    def _generate_rows(self, prompts: list[list[int]], seeds: list[int], temperature: float, top_p: float,
                       max_new_tokens: int, stop: StoppingCriteria | None = None
                       ) -> tuple[list[list[int]], list[list[float]]]:
        """One left-padded `generate` call; returns each row's generated ids and log-probs
        (after a row's stop token, `generate` fills in pad ids: the caller cuts them).
        `stop`: an extra stopping criterion (tool calls' stop strings)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                           dtype=torch.float64) for s in seeds])
        sampler = SeededSampler(uniforms, temperature, top_p)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  past_key_values=self._shared_prefill(input_ids, attention_mask),
                                  do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                  logits_processor=[sampler], use_cache=True,
                                  stopping_criteria=StoppingCriteriaList([stop] if stop is not None else []))
        generated = out[:, width:].cpu().tolist()
        logps = torch.stack(sampler.logprobs, dim=1).cpu().tolist() if sampler.logprobs else [[] for _ in prompts]
        return generated, logps

    def _shared_prefill(self, input_ids: Tensor, attention_mask: Tensor):
        """When the rows are groups of r > 1 equal consecutive prompts (the n samples of each),
        the KV cache of every prompt but its last token, computed once per group and repeated r
        times; `generate` then starts from it (None: no such groups, generate prefills alone)."""
        r = next((i for i in range(1, len(input_ids)) if not torch.equal(input_ids[i], input_ids[0])), len(input_ids))
        if r < 2 or len(input_ids) % r or input_ids.shape[1] < 2 \
                or not torch.equal(input_ids, input_ids[::r].repeat_interleave(r, 0)):
            return None
        ids, mask = input_ids[::r, :-1], attention_mask[::r, :-1]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate's, for left padding
        cache = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
        cache.batch_repeat_interleave(r)
        return cache

    def _fresh_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    @torch.no_grad()
    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-prob of tokens 1..L-1 of each sequence under the current weights (temperature 1)."""
        out = []
        for start in range(0, len(sequences), self.max_batch_rows):
            part = sequences[start:start + self.max_batch_rows]
            width = max(len(s) for s in part)
            ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, s in enumerate(part):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None].to(self.device))
            out += [logp[i, :len(s) - 1, 0].cpu().tolist() for i, s in enumerate(part)]
        return out

    # ---- weight updates ----------------------------------------------------------------
    def load_weight_buckets(self, buckets: list[Any]) -> int:
        """Loads safetensors buckets (`bytes`, or ObjectRefs to bytes) as one update; returns
        #tensors. Refs are fetched one at a time, so one bucket at a time sits here."""
        import ray

        self._checksums = {}
        loaded = 0
        for bucket in buckets:
            data = ray.get(bucket, timeout=self.rpc_timeout_s) if isinstance(bucket, ray.ObjectRef) else bucket
            loaded += self._load_named(bucket_from_bytes(data))
        return loaded

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          backend: str = "gloo") -> list[int]:
        """Joins the WeightGroup as rank `rank_offset` (one worker: no tensor parallelism);
        blocks until all `world_size` ranks have joined. Returns [rank]."""
        if backend != "gloo":
            raise ValueError(f"the hf rollout backend receives weights over gloo, not {backend!r}")
        self._group = WeightGroup(host, port, rank_offset, world_size, backend=backend, timeout_s=self.rpc_timeout_s)
        return [rank_offset]

    def receive_weights(self, metas: list[dict]) -> int:
        """Receives `BucketMeta.to_dict()` buckets broadcast by rank 0 (in this order), as one update."""
        if self._group is None:
            raise RuntimeError("receive_weights before init_weight_group")
        self._checksums = {}
        loaded = 0
        for meta_dict in metas:
            meta = BucketMeta.from_dict(meta_dict)
            flat = torch.empty(meta.total_bytes, dtype=torch.uint8)
            self._group.broadcast(flat, src=0)
            loaded += self._load_named(unflatten_bucket(flat, meta))
        return loaded

    def load_ipc_handles(self, handles: dict[str, bytes]) -> int:
        """Colocated route (GPU): `handles` maps GPU UUID -> `vllm_ext.ipc_handles_for(...)` bytes."""
        from rlhf.actors.vllm_ext import rebuild_ipc_tensors

        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        if uuid not in handles:
            raise KeyError(f"no IPC handles for this engine's GPU {uuid}; got {sorted(handles)}")
        self._checksums = {}
        return self._load_named(rebuild_ipc_tensors(handles[uuid], self.device.index or 0))

    def _load_named(self, named: NamedTensors) -> int:
        """Copies each tensor into the parameter of that name (a tied head follows its embedding)."""
        unknown = [name for name, _ in named if name not in self._params]
        if unknown:
            raise KeyError(f"weights for unknown parameters {unknown[:5]} (model has e.g. {list(self._params)[:3]})")
        with torch.no_grad():
            for name, tensor in named:
                self._checksums[name] = float(tensor.double().sum())
                self._params[name].copy_(tensor)
        return len(named)

    def weights_checksum(self) -> dict[str, float]:
        """float64 sum of each tensor received in the latest update, by the sender's name."""
        return dict(self._checksums)

    def shutdown(self) -> None:
        """Frees the model (the actor itself is ended by its owner)."""
        self.model = None
        self._params = {}
        self._group = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
