"""`rlhf rm` on preference files through the real CLI: a JSONL of HH-RLHF-shaped pairs and a
local Hugging Face dataset (save_to_disk) of UltraFeedback-shaped pairs, a tiny model built
from their texts, one Ray Train worker on CPU.

The preference is learnable from the text by an untrained tiny model: the chosen reply gives
the right sum and thanks politely, the rejected one a wrong sum and a rude brush-off (a tiny
model cannot do arithmetic; the wording carries the signal). Also, without Ray: how the
comparisons are built (ranks, end-of-turn id, the store's ranked rows), and bad input
leaving no output folder.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.recipe.comparisons import ComparisonStore, prompt_key

N_PAIRS = 100
RUDE = " Figure it out yourself next time."


def _pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        if (a, b) in seen:
            continue  # distinct prompts: the held-out split is by prompt
        seen.add((a, b))
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        out.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}. Happy to help!", f"{a} + {b} = {wrong}.{RUDE}"))
    return out


def _config(root: Path, comparisons: list, **rm) -> Path:
    cfg = {"name": "rm-stage", "seed": 0, "logger": {"backend": "none"},
           "model": {"policy": "tiny", "tiny": {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 400,
                                                "max_position_embeddings": 256}},
           "data": {"task": None, "comparisons": comparisons, "max_prompt_tokens": 64},
           "rollout": {"max_new_tokens": 32},
           "rm": {"num_workers": 1, "lr": 1e-3, "prompts_per_batch": 8, "epochs": 2, "held_out_fraction": 0.2,
                  **rm}}
    path = root / f"rm-{len(list(root.glob('rm-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("rm_stage")
    pairs = _pairs(N_PAIRS, seed=0)
    half = N_PAIRS // 2
    (root / "hh.jsonl").write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                                           for q, c, r in pairs[:half]))
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    datasets.Dataset.from_list([{"question": q, "chosen": [turn("user", q), turn("assistant", c)],
                                 "rejected": [turn("user", q), turn("assistant", r)]}
                                for q, c, r in pairs[half:]]).save_to_disk(str(root / "uf"))
    return root


@pytest.mark.slow
def test_rm_on_preference_files_learns_the_preference(data, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    sources = [str(data / "hh.jsonl"), {"path": str(data / "uf"), "format": "preference",
                                        "column": {"prompt": "question"}}]
    out = tmp_path / "run"
    try:
        assert main(["rm", str(_config(data, sources)), "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert f"rm done: {N_PAIRS} comparisons ({N_PAIRS} from data.comparisons, 0 from comparisons.sqlite) " \
           f"on {N_PAIRS} prompts (20 held out)" in printed, printed
    ckpt = out / "rm" / "checkpoint"
    summary = json.loads((ckpt / "rm_eval.json").read_text())
    assert summary["heldout_accuracy"] > 0.8, summary  # 1.0 when written; chance is 0.5
    assert summary["steps"] == 2 * 80 // 8
    assert (ckpt / "config.json").is_file() and (ckpt / "value_head.safetensors").is_file()
    assert (out / "init_model" / "config.json").is_file() and (out / "config.yaml").is_file()


def test_comparisons_from_files_and_the_store(data, tmp_path, monkeypatch):
    """What run_rm receives: pairs as rank [0, 1] with the end-of-turn id, then the store's
    ranked comparisons, without the all-tied ones and those earlier taken from data.comparisons."""
    import rlhf.orchestrator.recipe.rm as rm
    import rlhf.orchestrator.recipe.stages as stages
    from rlhf.orchestrator.config import load_config

    seen = {}

    def fake_run_rm(cfg, model, comparisons, demonstrations, tokenizer_path, out_dir, max_steps=None):
        seen.update(comparisons=comparisons, model=model, out_dir=out_dir, max_steps=max_steps)
        return rm.RMResult(str(out_dir), 1.0, 1.0, 0.0, "best_replies", 3, 9, 1)

    monkeypatch.setattr(rm, "run_rm", fake_run_rm)
    monkeypatch.setattr(stages, "start_ray", lambda address, num_cpus, run_dir=None: None)
    out = tmp_path / "run"
    prompt = [{"role": "user", "content": "What is 1 + 1?"}]
    with ComparisonStore(out / "comparisons.sqlite") as store:
        store.add(1, prompt_key(prompt), "people", prompt, ["2", "3"], [[5], [6]], [0, 1])
        store.add(1, prompt_key(prompt), "people", prompt, ["2", "2"], [[5], [5]], [0, 0])  # tie: unusable
        store.add(0, prompt_key(prompt), stages.PREFERENCE_POLICY, prompt, ["x", "y"], [[1], [2]], [0, 1])
    cfg = load_config(_config(data, [str(data / "hh.jsonl")]))
    stages.run_rm_stage(cfg, out, max_steps=3)

    comparisons = seen["comparisons"]
    assert len(comparisons) == N_PAIRS // 2 + 1 and seen["max_steps"] == 3
    assert seen["out_dir"] == out.resolve() / "rm"
    first, q, chosen, rejected = comparisons[0], *_pairs(1, seed=0)[0]
    assert first.prompt_messages == [{"role": "user", "content": q}] and first.replies == [chosen, rejected]
    assert first.ranks == [0, 1] and first.round == 0 and first.prompt_id == prompt_key(first.prompt_messages)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(seen["model"])
    assert first.reply_ids[0] == tok.encode(chosen, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert comparisons[-1].policy == "people" and comparisons[-1].replies == ["2", "3"]

    # store_preferences puts the same records into a store (the pipeline's round 0).
    with ComparisonStore(tmp_path / "other.sqlite") as store:
        assert stages.store_preferences(store, [stages.PreferencePair(prompt, "2", "3")], tok, [7]) == 1
        (c,) = store.load()
    assert (c.round, c.policy, c.ranks, c.reply_ids[1]) == (0, "data.comparisons", [0, 1],
                                                           tok.encode("3", add_special_tokens=False) + [7])


HH = ["{d}/hh.jsonl"]
BAD = [  # (case, data.comparisons, overrides, what the one line must contain)
    ("no comparisons at all", [], [], "data.comparisons: no comparisons to train on"),
    ("malformed line", ["{d}/bad.jsonl"], [], "bad.jsonl:2: malformed preference pair"),
    ("missing file", ["{d}/absent.jsonl"], [], "data.comparisons.0.path: no such file or folder"),
    ("missing column", [{"path": "{d}/uf", "format": "preference", "column": {"prompt": "instruction"}}], [],
     "data.comparisons.0: column 'instruction' (for field prompt, format preference) not in dataset columns"),
    # found after the output folder was made: it goes again
    ("missing model folder", HH, ["model.policy=/no/such/model"], "model.policy: no such model folder"),
]


@pytest.mark.parametrize("case,comparisons,overrides,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_leaves_no_folder(data, tmp_path, capsys, case, comparisons, overrides, expected):
    (data / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{\"prompt\": 1}\n")
    sources = [s.format(d=data) if isinstance(s, str) else {**s, "path": s["path"].format(d=data)} for s in comparisons]
    out = tmp_path / "run"
    assert main(["rm", str(_config(data, sources)), *overrides, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()
