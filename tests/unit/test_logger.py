"""Run logger: metrics.jsonl always; wandb offline without an API key; TensorBoard event files."""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.config import LoggerConfig
from rlhf.orchestrator.run.logger import RunLogger


@pytest.mark.parametrize("backend", ["none", "tensorboard", "wandb"])
def test_metrics_reach_jsonl_and_the_backend(tmp_path, monkeypatch, backend):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, LoggerConfig(backend=backend, project="t"), "run", {"seed": 0})
    logger.log({"step": 1, "reward/mean": 0.5, "kl/mean": float("nan"), "note": "x"})
    logger.log({"step": 2, "reward/mean": 0.7, "kl/mean": 0.1, "note": "y"})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in rows] == [0.5, 0.7]
    assert rows[0]["kl/mean"] is None  # non-finite floats become null, the file stays valid JSON
    if backend == "tensorboard":
        assert list((tmp_path / "tensorboard" / "t").glob("events.out.tfevents.*"))
    if backend == "wandb":
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, "without WANDB_API_KEY the run must be offline"
        assert list(runs[0].glob("*.wandb"))
