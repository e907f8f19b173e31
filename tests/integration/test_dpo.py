"""`rlhf dpo` through the real CLI: a preference file and a comparison store, a tiny model
built from their texts, one Ray Train worker and the reference actor on CPU.

The preference is visible in the text (the chosen reply thanks politely, the rejected one
brushes the user off), so DPO on an untrained tiny model raises the held-out implicit-reward
accuracy above chance within a few steps. One run with dpo (reference log-probs from the
reference actor, once), one with simpo (reference-free) in the same Ray session. Also,
without Ray: how pairs and sequences are built, and bad input leaving no output folder.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.recipe.comparisons import ComparisonStore, prompt_key

N_PAIRS = 80
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


def _config(root: Path, comparisons: list, **dpo) -> Path:
    cfg = {"name": "dpo-stage", "seed": 0, "logger": {"backend": "none"},
           "model": {"policy": "tiny", "tiny": {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 400,
                                                "max_position_embeddings": 256}},
           "data": {"task": None, "comparisons": comparisons, "max_prompt_tokens": 64},
           "dpo": {"num_workers": 1, "lr": 2e-3, "batch_size": 16, "micro_batch_size": 16, "epochs": 2,
                   "held_out_fraction": 0.25, "max_tokens": 96, **dpo}}
    path = root / f"dpo-{len(list(root.glob('dpo-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo_stage")
    pairs = _pairs(N_PAIRS, seed=0)
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                                              for q, c, r in pairs))
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Three CLI runs in one Ray session, on the same file (each its own folder): dpo, simpo, kto."""
    ray = pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("dpo_runs")
    out = {}
    try:
        for loss in ("dpo", "simpo", "kto"):
            folder = root / loss
            code = main(["dpo", str(_config(data, [str(data / "prefs.jsonl")], loss=loss, beta=2.0 if loss ==
                                            "simpo" else 0.1)), "--out", str(folder)])
            out[loss] = (code, folder)
    finally:
        ray.shutdown()
    return out


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "dpo" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_raises_heldout_implicit_reward_accuracy(runs):
    code, folder = runs["dpo"]
    assert code == 0
    rows = _metrics(folder)
    steps = [r for r in rows if "dpo/loss" in r]
    assert len(steps) == 2 * 60 // 16 + 1  # ceil(epochs * 60 train pairs / 16)
    assert {"dpo/loss", "dpo/margin", "dpo/chosen_logp", "dpo/rejected_logp", "dpo/accuracy", "dpo/lr"} <= set(steps[0])
    # Step 1: the policy is the reference, rewards 0, loss log 2 (reference log-probs came from another actor).
    assert steps[0]["dpo/loss"] == pytest.approx(0.693147, abs=1e-3)
    assert steps[-1]["dpo/margin"] > steps[0]["dpo/margin"] and steps[-1]["dpo/loss"] < steps[0]["dpo/loss"]
    summary = json.loads((folder / "dpo" / "summary.json").read_text())
    assert summary["heldout_accuracy_before"] == pytest.approx(0.5, abs=0.1)  # ties count half
    assert summary["heldout_accuracy_after"] > 0.8, summary
    assert rows[-1]["dpo/heldout_accuracy_after"] == summary["heldout_accuracy_after"]


@pytest.mark.slow
def test_dpo_folder_loads_and_prefers_the_chosen_reply(runs):
    """The saved folder loads with its tokenizer, and on a prompt it never saw it widens the
    log-prob gap between a polite and a rude reply relative to the starting model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = runs["dpo"]
    ckpt = folder / "dpo" / "checkpoint"
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template is not None and not list(ckpt.parent.glob(".checkpoint.tmp-*"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 45 + 7?"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]

    def gap(path: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        logps = []
        for reply in ("45 + 7 = 52. Happy to help!", f"45 + 7 = 53.{RUDE}"):
            ids = tok.encode(reply, add_special_tokens=False)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
            logps.append(float(logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum()))
        return logps[0] - logps[1]

    assert gap(ckpt) > gap(folder / "init_model")


@pytest.mark.slow
def test_simpo_runs_without_a_reference(runs):
    code, folder = runs["simpo"]
    assert code == 0
    steps = [r for r in _metrics(folder) if "dpo/loss" in r]
    assert steps[-1]["dpo/margin"] > steps[0]["dpo/margin"]
    summary = json.loads((folder / "dpo" / "summary.json").read_text())
    assert summary["heldout_accuracy_after"] > summary["heldout_accuracy_before"], summary


@pytest.mark.slow
def test_kto_trains_on_unpaired_rows(runs):
    code, folder = runs["kto"]
    assert code == 0
    steps = [r for r in _metrics(folder) if "dpo/loss" in r]
    assert steps[0]["dpo/kl_ref"] == pytest.approx(0.0, abs=1e-4)  # z0 = max(0, KL) of the reference itself
    assert steps[-1]["dpo/margin"] > steps[0]["dpo/margin"]
    summary = json.loads((folder / "dpo" / "summary.json").read_text())
    assert summary["heldout_accuracy_before"] == pytest.approx(0.5, abs=0.1)
    assert summary["heldout_accuracy_after"] > 0.7, summary


def test_pairs_and_sequences_from_the_store(data, tmp_path):
    """A 3-reply comparison gives its (better, worse) pairs by dpo.pairs; identical replies and
    all-tied comparisons give none; sequences keep the reply when cut to max_tokens."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus
    from rlhf.orchestrator.recipe.dpo import build_dpo_data, cut_sequence

    assert cut_sequence([1, 2, 3, 4], [7, 8], 4) == ([3, 4, 7, 8], [0, 0, 1, 1])
    assert cut_sequence([1, 2], [7, 8, 9, 10], 3) == ([2, 7, 8], [0, 1, 1])
    build_tiny_from_corpus(["user: hi\nassistant: a b c"], tmp_path / "m", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    path = tmp_path / "store.sqlite"
    with ComparisonStore(path) as store:
        for q, a in (("p", 5), ("q", 15)):  # reply ids a, a + 1, a + 2
            prompt = [{"role": "user", "content": q}]
            store.add(1, prompt_key(prompt), "pol", prompt, ["a", "b", "c"], [[a], [a + 1], [a + 2]], [0, 1, 2])
            store.add(1, prompt_key(prompt), "pol", prompt, ["a", "a"], [[a], [a]], [0, 1])  # same reply
            store.add(1, prompt_key(prompt), "pol", prompt, ["a", "b"], [[a], [a + 1]], [0, 0])  # tied
        comparisons = store.load()
    for mode, expected, n_seqs in (("all", 6, 6), ("best_worst", 2, 4)):
        cfg = load_config(_config(data, [], pairs=mode, held_out_fraction=0.0))
        d, (n_train, n_held) = build_dpo_data(cfg, comparisons, tok)
        assert (n_train, n_held) == (expected, 0)
        assert len(d.sequences) == n_seqs  # each (prompt, reply) in a pair, once
        c, r = d.train[0]
        assert d.sequences[c][0][-1] == 5 and d.sequences[c][1][-1] == 1 and d.sequences[r][0][-1] in (6, 7)
    kto, (rows, _) = build_dpo_data(load_config(_config(data, [], loss="kto", held_out_fraction=0.0)), comparisons, tok)
    assert rows == 4 and kto.desirable == [True, False, True, False]
    row, kl = kto.train[0]  # the KL row: this prompt with another prompt's reply
    assert kto.sequences[kl][0][:-1] == kto.sequences[row][0][:-1]
    assert (kto.sequences[row][0][-1], kto.sequences[kl][0][-1]) == (5, 15)


BAD = [  # (case, data.comparisons, overrides, what the one line must contain)
    ("no comparisons at all", [], [], "data.comparisons: no comparisons to train on"),
    ("chosen equals rejected", ["{d}/same.jsonl"], [],
     "same.jsonl:2: malformed preference pair: chosen equals rejected"),
    ("simpo with a reference", ["{d}/prefs.jsonl"], ["dpo.loss=simpo", "dpo.reference=true"], "dpo.reference"),
    ("beta not positive", ["{d}/prefs.jsonl"], ["dpo.beta=0"], "dpo.beta"),
]


@pytest.mark.parametrize("case,comparisons,overrides,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_leaves_no_folder(data, tmp_path, capsys, case, comparisons, overrides, expected):
    (data / "same.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                                     + json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    out = tmp_path / "run"
    assert main(["dpo", str(_config(data, [s.format(d=data) for s in comparisons])), *overrides,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


def test_an_empty_store_is_bad_input_and_keeps_the_folder(data, tmp_path, capsys):
    """A run folder whose store holds no ranked comparison: exit 2, and the folder (not made by
    this call) is left as it was."""
    out = tmp_path / "run"
    with ComparisonStore(out / "comparisons.sqlite") as store:
        prompt = [{"role": "user", "content": "p"}]
        store.add(1, prompt_key(prompt), "pol", prompt, ["a", "b"], [[5], [6]])  # unranked
    assert main(["dpo", str(_config(data, [])), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no ranked comparisons either" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["comparisons.sqlite"]
