"""Bad input through the real CLI: exit code 2, one line on stderr naming the key, line or
resource, no traceback, and no output folder left behind by the failed run.

Each row: (case, argv after `rlhf`, text the one line must contain). `{d}` is a folder with
the fixture files below; `{out}` a fresh output folder. No Ray cluster is left running. The
config and data checks run before one starts; the rows that need the model (a tiny one is
built for those that need a tokenizer: chat template, LoRA targets) are found while a local
Ray starts beside them (ppo/launch.RayStart), which is shut down again.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import ray
import yaml

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

PPO = ["ppo", "configs/ppo-tiny.yaml", "logger.backend=none"]
PIPE = ["pipeline", "configs/quickstart.yaml"]
EVIDENCE = ["pipeline", "configs/evidence-quickstart.yaml"]
LABELER = """
def nope_not_this(messages, reply):
    return 1.0


def one_arg(reply):
    return 1.0


def raises(messages, reply):
    return 1 / 0


def says_good(messages, reply):
    return "good"
"""
CASES = [
    ("malformed YAML", ["ppo", "{d}/broken.yaml"], "broken.yaml:3:1: invalid YAML"),
    ("duplicate YAML key", ["ppo", "{d}/dup.yaml"], "duplicate key 'seed'"),
    ("missing config file", ["ppo", "{d}/nope.yaml"], "nope.yaml"),
    ("unknown key", PPO + ["ppo.stepz=3"], "did you mean 'ppo.steps'"),
    ("mistyped value", PPO + ["ppo.steps=many"], "ppo.steps"),
    ("out-of-range value", PPO + ["ppo.clip=-0.1"], "ppo.clip"),
    ("unknown reward function", ["ppo", "{d}/reward.yaml"], "reward.functions.digit_fractoin"),
    ("batch sizes that do not divide", PPO + ["ppo.train_batch_size=7"], "ppo.train_batch_size"),
    ("GPU-only sync on CPU", PPO + ["sync.backend=nccl"], "sync.backend"),
    ("usage: --max-steps 0", PPO + ["--max-steps", "0"], "--max-steps"),
    ("missing model folder", PPO + ["model.policy=./no/such/model"], "model.policy"),
    ("LoRA targets that match no layer", PPO + ["policy.lora.target_modules=[foo]"], "policy.lora.target_modules"),
    ("data file missing", PPO + ["data.prompts={d}/absent.jsonl"], "absent.jsonl"),
    ("malformed JSONL line", PPO + ["data.prompts={d}/bad.jsonl"], "bad.jsonl:2"),
    ("empty dataset", PPO + ["data.prompts={d}/empty.jsonl"], "empty dataset"),
    ("every prompt too long (reject)", PPO + ["data.prompt_overflow=reject", "data.max_prompt_tokens=3"],
     "longer than data.max_prompt_tokens"),
    ("tokenizer without chat template", PPO + ["model.policy={d}/no_template"], "no chat template"),
    ("output folder is a file", PPO + ["--out", "{d}/a_file"], "not a folder"),
    ("output folder of another experiment", PPO + ["--out", "{d}/other_run"], "different experiment"),
    ("output folder with checkpoints, no --resume", PPO + ["--out", "{d}/with_ckpt"], "--resume"),
    ("chat with a missing checkpoint", ["chat", "{d}/no_model", "--once", "hi"], "no_model"),
    # Anyone's data and labelers (`rlhf pipeline` checks all of it before Ray starts).
    ("removed key data.train", PPO + ["data.train=x.jsonl"], "data.prompts"),
    ("unknown data format", PIPE + ["data.sft=[{{path: {d}/good.jsonl, format: dialog}}]"], "data.sft.0.format"),
    ("missing column in a JSONL source", PIPE + ["data.sft=[{d}/text_only.jsonl]"], "'messages'"),
    ("dataset folder without the column", PIPE + ["data.sft=[{d}/hf_text]"], "'messages'"),
    ("prompt_response line without its response", PIPE + [
        "data.sft=[{{path: {d}/half_pr.jsonl, format: prompt_response}}]"], "half_pr.jsonl:1"),
    ("preference pair without rejected", PIPE + [
        "data.comparisons=[{{path: {d}/half_pairs.jsonl, format: preference}}]"], "rejected"),
    ("labeler file missing", PIPE + ["labeler.kind=python", "labeler.target={d}/nolabeler.py:score"], "nolabeler.py"),
    ("labeler attribute missing", PIPE + ["labeler.kind=python", "labeler.target={d}/labeler.py:nope"], "nope"),
    ("labeler with a wrong signature", PIPE + ["labeler.kind=python", "labeler.target={d}/labeler.py:one_arg"],
     "one_arg"),
    ("labeler raising", PIPE + ["labeler.kind=python", "labeler.target={d}/labeler.py:raises"], "ZeroDivisionError"),
    ("labeler returning a string", PIPE + ["labeler.kind=python", "labeler.target={d}/labeler.py:says_good"],
     "says_good"),
    ("unknown task", PIPE + ["data.task=chess"], "data.task"),
    ("task factory missing", PIPE + ["data.task={d}/labeler.py:NoTask"], "NoTask"),
    ("judge that cannot score", PIPE + ["pipeline.judge={{kind: file, path: {d}/good.jsonl}}"], "pipeline.judge"),
    ("human labeler, nothing ranked, --resume", PIPE + [
        "labeler.kind=human", "pipeline.judge={{kind: task}}", "--resume", "--out", "{d}/human_run"],
     "wait for ranking"),
    # Model import and known names (orchestrator/models/gguf_import.py, registry.py).
    ("model import: truncated GGUF", ["model", "import", "{d}/truncated.gguf", "--out", "{out}"], "is truncated"),
    ("model import: not a GGUF", ["model", "import", "{d}/good.jsonl", "--out", "{out}"], "is not a GGUF file"),
    ("model import: --out exists, no --force", ["model", "import", "{d}/truncated.gguf", "--out", "{d}/other_run"],
     "pass --force"),
    ("known model name misspelt", PPO + ["model.policy=smollm2-135m"], "did you mean 'smollm2-135m-instruct'"),
    ("dpo: reference-free loss with a reference", ["dpo", "configs/quickstart.yaml", "dpo.loss=simpo",
                                                   "dpo.reference=true", "--out", "{out}"], "dpo.reference"),
    ("dpo: beta 0", ["dpo", "configs/quickstart.yaml", "dpo.beta=0", "--out", "{out}"], "dpo.beta"),
    ("dpo: no comparisons", ["dpo", "configs/quickstart.yaml", "--out", "{out}"], "no comparisons to train on"),
    # Sparrow's evidence: the search tool's corpus is checked (and indexed) before anything is written.
    ("evidence corpus with a malformed line", EVIDENCE + ["evidence.corpus={d}/bad_corpus.jsonl"], "bad_corpus.jsonl:2"),
    ("empty evidence corpus", EVIDENCE + ["evidence.corpus={d}/empty.jsonl"], "an empty corpus"),
    ("evidence corpus over the size limit", EVIDENCE + ["evidence.corpus={d}/good_corpus.jsonl",
                                                        "evidence.max_corpus_mb=0.00001"], "evidence.max_corpus_mb"),
    ("search with no corpus", PIPE + ["rollout.tools=[search]"], "evidence.corpus"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    (d / "broken.yaml").write_text("name: x\nppo: [1, 2\n")
    (d / "dup.yaml").write_text("seed: 1\nseed: 2\n")
    ppo_tiny = yaml.safe_load(Path("configs/ppo-tiny.yaml").read_text())
    ppo_tiny["reward"]["functions"] = {"digit_fractoin": 1.0}
    (d / "reward.yaml").write_text(yaml.safe_dump(ppo_tiny))
    good = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    (d / "bad.jsonl").write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user"}]}\n')
    (d / "empty.jsonl").write_text("\n\n")
    model = build_tiny_from_corpus(sample_corpus(), d / "no_template", seed=0)
    (Path(model) / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((Path(model) / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (Path(model) / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "a_file").write_text("not a folder")
    (d / "other_run").mkdir()
    (d / "other_run" / "config.yaml").write_text("name: someone-else\n")
    (d / "with_ckpt" / "checkpoints" / "step_000002").mkdir(parents=True)
    (d / "with_ckpt" / "config.yaml").write_text("name: ppo-tiny\n")
    (d / "with_ckpt" / "checkpoints" / "step_000002" / "trainer_state.json").write_text("{}")
    (d / "good.jsonl").write_text(json.dumps(good) + "\n")
    doc = {"title": "Veltra", "text": "Its capital is Osk."}
    (d / "bad_corpus.jsonl").write_text(json.dumps(doc) + "\n" + '{"title": "Osk", "text": \n')
    (d / "good_corpus.jsonl").write_text(json.dumps(doc) + "\n")
    (d / "text_only.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (d / "half_pr.jsonl").write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    (d / "half_pairs.jsonl").write_text(json.dumps({"prompt": "2+2?", "chosen": "4"}) + "\n")
    (d / "labeler.py").write_text(LABELER)
    from datasets import Dataset

    Dataset.from_list([{"text": "hello"}, {"text": "bye"}]).save_to_disk(str(d / "hf_text"))
    _human_run(d / "human_run")
    # A GGUF header promising one tensor, then nothing: what a download cut short looks like.
    (d / "truncated.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0))
    return d


def _human_run(out: Path) -> None:
    """A pipeline folder whose round 1 replies were collected for people and not ranked yet."""
    from rlhf.orchestrator.config import load_config, to_yaml
    from rlhf.orchestrator.recipe.comparisons import ComparisonStore

    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(load_config("configs/quickstart.yaml", ["labeler.kind=human"])))
    (out / "pipeline_state.json").write_text(json.dumps({"stages": {"sft": {"checkpoint": "x"},
                                                                   "round1/comparisons": {"count": 1}}}))
    with ComparisonStore(out / "comparisons.sqlite") as store:
        store.add(1, "p", "x", [{"role": "user", "content": "2+2?"}], ["4", "5"], [[1], [2]], None)


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(fixtures, tmp_path, capsys, case, argv, expected):
    out = tmp_path / "out"
    argv = [a.format(d=fixtures, out=out) for a in argv]
    if "--out" not in argv and argv[0] != "chat":
        argv += ["--out", str(out)]
    before = sorted(p.name for p in fixtures.rglob("*"))
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback (most recent call last)" not in err[0] and expected in err[0], err[0]
    assert not out.exists(), f"{case}: left {sorted(p.name for p in out.rglob('*'))}"
    assert sorted(p.name for p in fixtures.rglob("*")) == before  # fixture folders untouched
    assert not ray.is_initialized(), f"{case}: a Ray cluster was left running"


def test_the_table_is_long_enough():
    assert len(CASES) >= 30


def test_prompts_over_the_limit_are_truncated_and_counted():
    from rlhf.orchestrator.data.prompts import build_prompts

    class Tok:  # one token per character: lengths are easy to count
        def apply_chat_template(self, prompt, **_):
            return {"input_ids": list(range(len(prompt[-1]["content"])))}

    dialogues = [[{"role": "user", "content": "x" * n}] for n in (3, 8, 12)]
    truncated = build_prompts(dialogues, Tok(), max_tokens=5, overflow="truncate")
    assert truncated.truncated == 2 and truncated.rejected == 0 and [len(t) for t in truncated.token_ids] == [3, 5, 5]
    rejected = build_prompts(dialogues, Tok(), max_tokens=5, overflow="reject")
    assert rejected.rejected == 2 and rejected.truncated == 0 and [len(t) for t in rejected.token_ids] == [3]
