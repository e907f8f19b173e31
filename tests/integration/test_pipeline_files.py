"""`rlhf pipeline` as a new user runs it: no built-in task, everything from files in a folder
of their own (demonstrations, prompts, eval prompts, a labeler function given by file path,
a config with relative paths), a tiny model, through the real CLI.

Checks every stage's artefacts, that the stored ranks are the ones the labeler's scores
imply, that the reward model deliberately weakened (a handful of comparisons) cannot make
the chosen policy score below SFT on the held-out judge, that the report shows the
RM-reward vs judge-score curve, and the `human` labeler's stop-and-resume.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.orchestrator.data.labelers import ranks_from_scores
from rlhf.orchestrator.recipe.comparisons import ComparisonStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RLHF = str(Path(sys.executable).with_name("rlhf"))

# The README example's labeler (examples/byod/my_labeler.py), copied into the user's folder.
LABELER = ROOT / "examples" / "byod" / "my_labeler.py"


def _dialogue(rng: random.Random, with_reply: bool) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    messages = [{"role": "user", "content": f"Add {a} and {b}."}]
    if with_reply:
        polite = " Thanks for asking!" if rng.random() < 0.5 else ""
        messages.append({"role": "assistant", "content": f"{a} + {b} = {a + b}.{polite}"})
    return {"messages": messages}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The user's folder: data files, labeler file, config with paths relative to itself."""
    d = tmp_path_factory.mktemp("my_project")
    rng = random.Random(0)
    _write_jsonl(d / "demos.jsonl", [_dialogue(rng, True) for _ in range(400)])
    _write_jsonl(d / "prompts.jsonl", [_dialogue(rng, False) for _ in range(200)])
    _write_jsonl(d / "eval.jsonl", [_dialogue(rng, False) for _ in range(16)])
    shutil.copy(LABELER, d / "my_labeler.py")
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["name"] = "my-files"
    cfg["data"] = {"task": None, "sft": ["demos.jsonl"], "prompts": ["prompts.jsonl"], "eval": ["eval.jsonl"],
                   "max_prompt_tokens": 48}
    cfg["labeler"] = {"kind": "python", "target": "my_labeler.py:score"}
    cfg["rollout"].update(backend="hf", max_new_tokens=16)
    cfg["model"]["tiny"]["max_position_embeddings"] = 128
    # Deliberately weak reward model: 12 compared prompts, one epoch.
    cfg["rm"].update(prompts_per_round=12, epochs=1, held_out_fraction=0.25)
    cfg["sft"].update(max_steps=30)
    cfg["ppo"].update(steps=6, prompts_per_step=8, train_batch_size=16, micro_batch_size=16)
    cfg["pipeline"].update(rounds=1, eval_prompts=16, eval_samples=2, eval_every=2, eval_subset=8)
    cfg["checkpoint"] = {"every": 0}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _pipeline(project: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # Run from another folder: the config's relative paths resolve against its own folder.
    return subprocess.run([RLHF, "pipeline", str(project / "config.yaml"), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1500, cwd=out.parent)


@pytest.fixture(scope="module")
def run(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("files_run") / "run"
    proc = _pipeline(project, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _load_labeler(project: Path):
    spec = importlib.util.spec_from_file_location("user_labeler", project / "my_labeler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score


def test_every_stage_leaves_its_artefacts_and_paths_are_absolute(project, run):
    out, proc = run
    assert "pipeline done:" in proc.stdout
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert {"sft", "round1/comparisons", "round1/rm", "round1/ppo", "round1/eval", "best"} <= set(state)
    for folder in (out / "sft" / "checkpoint", out / "round1" / "rm" / "checkpoint"):
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["sft"][0]["path"] == str(project / "demos.jsonl")
    assert saved["labeler"]["target"] == f"{project / 'my_labeler.py'}:score"
    ev = json.loads((out / "round1" / "eval.json").read_text())
    for key in ("rm_pairwise_accuracy", "labeler_score/sft", "labeler_score/final", "win_rate_vs_sft"):
        assert key in ev


def test_stored_ranks_are_the_ones_the_labeler_scores_imply(project, run):
    out, _ = run
    score = _load_labeler(project)
    with ComparisonStore(out / "comparisons.sqlite") as store:
        comparisons = store.load()
    assert len(comparisons) == 12
    for c in comparisons:
        assert c.ranks == ranks_from_scores([score(c.prompt_messages, r) for r in c.replies])
    assert any(len(set(c.ranks)) > 1 for c in comparisons)


def test_judge_logged_during_ppo_and_chosen_policy_not_below_sft(run):
    out, _ = run
    rows = [json.loads(line) for line in (out / "round1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    judged = [r["step"] for r in rows if r.get("eval/labeler_score") is not None]
    assert judged[0] == 0 and set(judged) <= {0, 2, 4, 6} and len(judged) >= 2  # may stop early
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labeler_score/chosen"] >= summary["labeler_score/sft"]
    assert (out / "round1" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval/labeler_score" in (out / "round1" / "report.md").read_text()


def test_human_labeler_stops_people_rank_through_the_api_then_resume_trains_on_their_rankings(project, tmp_path):
    from fastapi.testclient import TestClient

    from rlhf.orchestrator.label.app import create_app
    from rlhf.orchestrator.label.db import LabelDB

    out = tmp_path / "human"
    extra = ["labeler.kind=human", "labeler.target=null", "labeler.min_ranked=10", "label.overlap=1.0",
             f"pipeline.judge={{kind: python, target: {project / 'my_labeler.py'}:score}}",
             "sft.max_steps=5", "ppo.steps=2", "pipeline.eval_every=0", "pipeline.eval_prompts=4"]
    first = _pipeline(project, out, *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    waiting = [line for line in first.stdout.splitlines() if "wait for ranking" in line]
    assert len(waiting) == 1 and "--resume" in waiting[0] and "12 comparisons" in waiting[0]
    assert f"rlhf label serve {out}" in waiting[0]
    db = sqlite3.connect(out / "comparisons.sqlite")
    assert db.execute("SELECT COUNT(*) FROM replies WHERE rank IS NULL").fetchone()[0] == 12 * 4
    again = _pipeline(project, out, *extra, "--resume")  # nothing ranked yet: bad input, one line
    assert again.returncode == 2 and "wait for ranking" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    # Two people rank through the API: ann the whole queue, bob (overlap 1.0) three of the same items.
    labels = LabelDB(out / "comparisons.sqlite")
    tokens = {"ann": labels.add_labeler("ann"), "bob": labels.add_labeler("bob")}
    client = TestClient(create_app(out).app)  # the run's config.yaml: label.overlap 1.0
    score = _load_labeler(project)
    for who, limit in (("ann", 12), ("bob", 3)):
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        items = client.get(f"/api/queue?limit={limit}", headers=headers).json()
        assert len(items) == limit
        for item in items:
            replies = sorted(item["replies"], key=lambda r: r["idx"])
            ranks = ranks_from_scores([score(item["prompt_messages"], r["text"]) for r in replies])
            posted = client.post(f"/api/comparisons/{item['id']}/ranking", json={"ranks": ranks}, headers=headers)
            assert posted.status_code == 200, posted.text
    assert db.execute("SELECT COUNT(*) FROM replies WHERE rank IS NULL").fetchone()[0] == 0
    db.close()
    resumed = _pipeline(project, out, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pipeline done:" in resumed.stdout
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert state["round1/rm"]["comparisons"] == 15  # each labeler's ranking is one comparison
    assert (out / "round1" / "ppo" / "metrics.jsonl").is_file() and (out / "round1" / "eval.json").is_file()
