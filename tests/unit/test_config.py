"""Config loading and validation: every shipped YAML validates; bad input is one line, exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.config import (ExperimentConfig, apply_overrides, describe_keys, load_config,
                                      to_yaml)
from rlhf.orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    # The resolved YAML round-trips to the same config.
    assert ExperimentConfig.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


def test_configs_folder_is_not_empty():
    assert QUICKSTART in CONFIGS


def test_overrides_are_dotted_and_typed():
    cfg = load_config(QUICKSTART, ["ppo.kl.coef=0.5", "rollout.n_samples=8", "ppo.dual_clip=3",
                                   "model.reward=null", "policy.lr=1e-6"])
    assert cfg.ppo.kl.coef == 0.5
    assert cfg.rollout.n_samples == 8
    assert cfg.ppo.dual_clip == 3.0
    assert cfg.model.reward is None
    assert cfg.policy.lr == pytest.approx(1e-6)  # YAML 1.1 reads "1e-6" as a string; pydantic parses it


def test_defaults_fill_missing_keys(tmp_path):
    path = tmp_path / "min.yaml"
    path.write_text("name: tiny-run\n")
    cfg = load_config(path)
    assert cfg.name == "tiny-run"
    assert cfg.ppo == ExperimentConfig().ppo


def test_apply_overrides_does_not_mutate_input():
    data = {"ppo": {"clip": 0.2}}
    out = apply_overrides(data, ["ppo.clip=0.3"])
    assert data == {"ppo": {"clip": 0.2}} and out == {"ppo": {"clip": 0.3}}


def test_describe_keys_covers_every_leaf_with_a_description():
    keys = {key: (default, desc) for key, _, default, desc in describe_keys()}
    assert keys["ppo.kl.coef"][0] == 0.05
    assert keys["critic.lr"][0] == 5e-6
    assert all(desc for _, desc in keys.values())
    resolved = yaml.safe_load(to_yaml(ExperimentConfig()))

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]

    # Optional sections (null by default, e.g. policy.lora) are a leaf in the YAML and list their keys too.
    optional = {k for k, (default, _) in keys.items() if default is None and any(o.startswith(k + ".") for o in keys)}
    assert {"policy.lora", "pipeline.judge"} <= optional
    assert set(leaves(resolved)) == {k for k in keys if not any(k.startswith(o + ".") for o in optional)}


# Each bad input: (YAML text or None for the quickstart file, overrides, dotted key or file fragment
# that the one-line message must name, a fragment of the reason).
BAD = [
    (None, ["ppo.clipp=0.1"], "ppo.clipp", "did you mean 'ppo.clip'"),
    (None, ["polcy.lr=0.1"], "polcy", "did you mean 'policy'"),
    (None, ["policy.lr=-0.001"], "policy.lr", "greater than 0"),
    (None, ["ppo.clip=0"], "ppo.clip", "greater than 0"),
    (None, ["ppo.epochs=two"], "ppo.epochs", "valid integer"),
    (None, ["ppo.kl.estimator=k4"], "ppo.kl.estimator", "'k1', 'k2' or 'k3'"),
    (None, ["ppo.train_batch_size=24"], "ppo.train_batch_size", "must divide"),
    (None, ["ppo.micro_batch_size=3"], "ppo.micro_batch_size", "must divide"),
    (None, ["ppo.advantage=rloo", "rollout.n_samples=1", "ppo.prompts_per_step=8", "ppo.train_batch_size=8",
            "ppo.micro_batch_size=4"],
     "rollout.n_samples", "n_samples >= 2"),
    (None, ["model.tiny.head_dim=16"], "model.tiny.head_dim", "greater than or equal to 64"),
    (None, ["rollout.top_p=1.5"], "rollout.top_p", "less than or equal to 1"),
    (None, ["ppo.dual_clip=0.5"], "ppo.dual_clip", "greater than 1"),
    (None, ["sync.backend=nccl"], "sync.backend", "needs GPUs"),
    (None, ["ppo.kl=0.1"], "ppo.kl", "must be a section"),
    (None, ["ppo.clip.low=0.1"], "ppo.clip.low", "is a value, not a section"),
    (None, ["ppo.clip"], "ppo.clip", "dotted.key=value"),
    ("ppo:\n  clip: 0.2\n  clip: 0.3\n", [], ":3:", "duplicate key 'clip'"),
    ("ppo:\n  clip: [0.2\n", [], "invalid YAML", ""),
    ("- a\n- b\n", [], "top level must be a mapping", ""),
    ("name: x\nrollout:\n  engins: 2\n", [], "rollout.engins", "did you mean 'rollout.engines'"),
    ("seed: -1\n", [], "seed", "greater than or equal to 0"),
    (None, ["reward.functions={forbidden_phrase: 1.0}"], "reward.forbidden_phrases", "non-empty phrase"),
    (None, ["reward.functions.digit_fracton=1"], "reward.functions.digit_fracton", "did you mean 'digit_fraction'"),
    (None, ["rm.labeler=file"], "rm.labeler", "replaced by labeler.kind"),
    (None, ["data.train=x.jsonl"], "data.train", "replaced by data.prompts"),
    (None, ["labeler.kind=file"], "labeler.path", "needs a path"),
    (None, ["labeler.kind=python"], "labeler.target", "needs target"),
    (None, ["data.sft=[{format: messages}]"], "data.sft.0.path", "Field required"),
    (None, ["data.prompts=[{path: p.jsonl, format: dialog}]"], "data.prompts.0.format", "messages"),
    (None, ["pipeline.judge={kind: human}"], "pipeline.judge.kind", "human is not a judge"),
    (None, ["data.max_prompt_tokens=250"], "data.max_prompt_tokens", "exceeds model.tiny.max_position_embeddings"),
    ("model:\n  tiny:\n    num_heads: 3\n    num_kv_heads: 2\n", [], "model.tiny.num_kv_heads", "must divide"),
]


def _write(tmp_path, text):
    if text is None:
        return QUICKSTART
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,overrides,key,reason", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, overrides, key, reason):
    path = _write(tmp_path, text)
    code = main(["config", "show", str(path), *overrides])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["config", "show", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_error_carries_key():
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, ["ppo.gamma=2"])
    assert info.value.key == "ppo.gamma"


def test_cli_subprocess_exit_codes_and_no_traceback():
    """The installed console script: show works, a bad key is exit 2 with one stderr line."""
    rlhf = Path(sys.executable).with_name("rlhf")
    ok = subprocess.run([rlhf, "config", "show", QUICKSTART, "ppo.clip=0.3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["ppo"]["clip"] == 0.3
    bad = subprocess.run([rlhf, "config", "show", QUICKSTART, "ppo.lr=1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "ppo.lr" in bad.stderr
    usage = subprocess.run([rlhf, "nosuchcommand"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1


def test_relative_paths_resolve_against_the_config_folder_then_the_working_directory(tmp_path, monkeypatch):
    from rlhf.orchestrator.config import load_config

    project, cwd = tmp_path / "project", tmp_path / "cwd"
    (project / "data").mkdir(parents=True)
    cwd.mkdir()
    (project / "data" / "demos.jsonl").write_text("")
    (cwd / "prompts.jsonl").write_text("")
    (project / "labeler.py").write_text("")
    (project / "exp.yaml").write_text(
        "data:\n  task: null\n  sft: data/demos.jsonl\n  prompts: [prompts.jsonl]\n"
        "  eval: [{path: missing.jsonl, weight: 2}]\nlabeler:\n  kind: python\n  target: labeler.py:score\n")
    monkeypatch.chdir(cwd)
    cfg = load_config(project / "exp.yaml")
    assert cfg.data.sft[0].path == str(project / "data" / "demos.jsonl")   # config folder first
    assert cfg.data.prompts[0].path == str(cwd / "prompts.jsonl")           # then the working directory
    assert cfg.data.eval[0].path == str(cwd / "missing.jsonl") and cfg.data.eval[0].weight == 2
    assert cfg.labeler.target == f"{project / 'labeler.py'}:score"
    assert load_config(project / "exp.yaml", ["labeler.target=pkg.mod:fn"]).labeler.target == "pkg.mod:fn"
