"""Secret names, redaction, and where redaction is applied (config show, config.yaml, metrics)."""
from __future__ import annotations

import json

import pytest
import yaml

from rlhf.orchestrator.run import secrets
from rlhf.orchestrator.run.secrets import MASK, Redactor, is_secret_name, redact, redact_env

PLANTED = "planted-wandb-key-7f3a9c1e"


@pytest.fixture
def planted(monkeypatch, tmp_path):
    """A secret in the environment and no Ray token file (HOME points to an empty folder)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)
    return PLANTED


@pytest.mark.parametrize("name", ["RAY_AUTH_TOKEN", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                                  "AZURE_CLIENT_SECRET", "AZURE_STORAGE_SECRET_X", "GITHUB_TOKEN",
                                  "MY_SERVICE_KEY", "DB_PASSWORD", "SOME_SECRET", "hf_token"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "RAY_ADDRESS", "RAY_AUTH_MODE", "MAX_NEW_TOKENS",
                                  "KEYBOARD", "AZURE_LOCATION", "TOKENIZERS_PARALLELISM"])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_redact_masks_values_of_secret_variables(planted):
    text = f"wandb key is {planted}; again:{planted}."
    assert redact(text) == f"wandb key is {MASK}; again:{MASK}."


def test_redact_masks_assignments_of_secret_names_with_unknown_values(planted):
    text = 'HF_TOKEN=hf_abcdefghijkl {"RAY_AUTH_TOKEN": "tok-123456789"} RAY_AUTH_MODE=token'
    out = redact(text)
    assert "hf_abcdefghijkl" not in out and "tok-123456789" not in out
    assert "HF_TOKEN=***" in out and '"RAY_AUTH_TOKEN": "***"' in out
    assert "RAY_AUTH_MODE=token" in out  # not a secret: left alone


def test_redact_leaves_lowercase_yaml_keys_and_short_values_alone(planted, monkeypatch):
    # A 3-character "secret" would garble every occurrence of "abc" while protecting nothing.
    monkeypatch.setenv("SHORT_KEY", "abc")
    text = "pad_token: <pad>\nmax_new_tokens: 16\nname: abc\n"
    assert redact(text) == text


def test_longest_secret_is_masked_whole(planted, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", planted + "-and-more")
    assert redact(f"x {planted}-and-more y") == f"x {MASK} y"


def test_ray_token_file_is_a_secret(planted, tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef0123456789abcdef\n")
    assert redact("token 0123456789abcdef0123456789abcdef") == f"token {MASK}"


def test_extra_values_and_redactor_reuse(planted):
    redactor = Redactor(extra=["given-on-the-command-line"])
    assert redactor("a given-on-the-command-line b") == f"a {MASK} b"
    assert redactor(f"{planted}") == MASK


def test_redact_env_masks_by_name():
    env = {"WANDB_API_KEY": "x", "PYTHONUNBUFFERED": "1"}
    assert redact_env(env) == {"WANDB_API_KEY": MASK, "PYTHONUNBUFFERED": "1"}


def test_config_show_and_run_folder_never_hold_a_planted_secret(planted, tmp_path, capsys):
    """A secret that reached a config value (here the run name) is masked on screen and on disk."""
    from rlhf.orchestrator.cli import main
    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.run.rundir import MetricsLog, prepare_run_dir

    assert main(["config", "show", "configs/ppo-tiny.yaml", f"name=leak-{planted}"]) == 0
    shown = capsys.readouterr().out
    assert planted not in shown and f"name: leak-{MASK}" in shown

    cfg = load_config("configs/ppo-tiny.yaml", [f"name=leak-{planted}"])
    out = prepare_run_dir(tmp_path / "run", cfg)
    written = (out / "config.yaml").read_text()
    assert planted not in written and yaml.safe_load(written)["model"]["policy"] == "tiny"
    with MetricsLog(out / "metrics.jsonl") as log:
        log.log({"step": 1, "note": f"key={planted}", "reward/mean": 0.5})
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row == {"step": 1, "note": f"key={MASK}", "reward/mean": 0.5}


def test_secret_values_ignore_empty_and_non_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    values = secrets.secret_values({"HF_TOKEN": "", "PATH": "/usr/bin:/bin/long", "X_KEY": "k" * 10})
    assert values == ["k" * 10]
