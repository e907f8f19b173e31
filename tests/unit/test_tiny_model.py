"""Fast tests of the tiny local model builder (tokenizer, chat template, HF folder)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.orchestrator.models.tiny import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    TinyModelSpec,
    build_tiny_from_corpus,
    build_tiny_model,
    is_complete_model_dir,
    sample_corpus,
    stop_token_ids,
    train_tokenizer,
)

DIALOGUE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6!"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(sample_corpus(), vocab_size=512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return build_tiny_model(TinyModelSpec(), tokenizer, tmp_path_factory.mktemp("m") / "tiny")


def test_tokenizer_round_trips_text_and_keeps_specials(tokenizer):
    for text in ["The model writes.", "  odd   spacing\n\ttabs", "émoji 🙂 ünïcode"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 512
    assert tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [0, 1, 2]
    assert tokenizer.eos_token == ENDOFTEXT and tokenizer.pad_token == ENDOFTEXT
    # Special tokens stay one token each, even glued to text.
    assert tokenizer(f"{IM_START}user\nhi{IM_END}")["input_ids"][0] == 1
    assert tokenizer(f"{IM_START}user\nhi{IM_END}")["input_ids"][-1] == 2


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_tokenizer_encodes_like_trained_one(tmp_path, tokenizer, arch):
    # transformers picks the tokenizer class from the config's model_type (Qwen2Tokenizer
    # rebuilds its own pre-tokeniser); vLLM loads it the same way.
    folder = build_tiny_model(TinyModelSpec(arch=arch), tokenizer, tmp_path / arch)
    loaded = AutoTokenizer.from_pretrained(folder)
    texts = sample_corpus(50, seed=7) + [
        "digits 12345 and 3.14", " lead space", "a\n\nb  c\t", "émoji 🙂 ünïcode",
        f"{IM_START}user\nhi{IM_END}\n{ENDOFTEXT}",
    ]
    for text in texts:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.apply_chat_template(DIALOGUE, tokenize=False) == tokenizer.apply_chat_template(
        DIALOGUE, tokenize=False)
    assert loaded.bos_token is None and loaded.eos_token == ENDOFTEXT


def test_tokenizer_training_is_deterministic(tokenizer):
    again = train_tokenizer(sample_corpus(), vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(DIALOGUE[:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(DIALOGUE[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tokenizer):
    out = tokenizer.apply_chat_template(
        DIALOGUE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Expected: the ids of each assistant content followed by <|im_end|>, in order.
    expected = []
    for message in DIALOGUE:
        if message["role"] == "assistant":
            expected += tokenizer(message["content"])["input_ids"]
            expected.append(tokenizer.convert_tokens_to_ids(IM_END))
    assert [t for t, m in zip(ids, mask) if m] == expected
    # The masked tokens form exactly two contiguous runs (one per assistant turn).
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(starts) == 2
    masked_text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert masked_text == f"It is 4.{IM_END}It is 6!{IM_END}"


def test_model_folder_loads_and_generates_deterministically(model_dir, tokenizer):
    assert is_complete_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert list(model.generation_config.eos_token_id) == stop_token_ids(tok) == [2, 0]
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # vLLM reads this file to know when to stop

    prompt = tok.apply_chat_template(DIALOGUE[:2], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    outs = [
        model.generate(**prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8)
        for _ in range(2)
    ]
    assert outs[0].shape == (1, prompt["input_ids"].shape[1] + 8)
    assert torch.equal(outs[0], outs[1])


def test_generation_stops_at_im_end(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(DIALOGUE[:2], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    im_end = tok.convert_tokens_to_ids(IM_END)
    # Bias the logits so <|im_end|> is the greedy choice: generation must stop right there.
    out = model.generate(**prompt, do_sample=False, max_new_tokens=8,
                         sequence_bias={(im_end,): 1e4})
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [im_end]


def test_same_seed_gives_identical_weights(tmp_path, tokenizer):
    spec = TinyModelSpec(arch="llama", num_kv_heads=2, tie_word_embeddings=True)
    a = load_file(build_tiny_model(spec, tokenizer, tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(spec, tokenizer, tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny_model(spec, tokenizer, tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert "lm_head.weight" not in a  # tied


@pytest.mark.parametrize("head_dim", [16, 32, 63])
def test_head_dim_below_64_rejected(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        TinyModelSpec(head_dim=head_dim)


def test_atomic_write_and_replace_rules(tmp_path, tokenizer, monkeypatch):
    out = build_tiny_from_corpus(sample_corpus(50), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left
    with pytest.raises(FileExistsError):
        build_tiny_model(TinyModelSpec(), tokenizer, out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model folder"):
        build_tiny_model(TinyModelSpec(), tokenizer, tmp_path / "junk")
    (tmp_path / "empty").mkdir()
    build_tiny_model(TinyModelSpec(), tokenizer, tmp_path / "empty")
    assert is_complete_model_dir(tmp_path / "empty")

    before = (out / "model.safetensors").read_bytes()
    build_tiny_model(TinyModelSpec(), tokenizer, out, seed=1, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before

    # A failure while writing leaves neither a half-written folder nor a temp folder,
    # and an existing folder untouched.
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(TinyModelSpec(), tokenizer, tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(TinyModelSpec(), tokenizer, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk", "m"]
    assert is_complete_model_dir(out)
