"""Where step metrics go: always metrics.jsonl, plus wandb or TensorBoard per `logger.backend`.

wandb runs offline unless an API key is present (`logger.wandb_mode: auto`), so a run on a
machine without network never blocks on a login; `wandb sync DIR/wandb/offline-run-*`
uploads it later.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf.orchestrator.config import LoggerConfig
from rlhf.orchestrator.run.rundir import MetricsLog
from rlhf.orchestrator.run.secrets import redact


class RunLogger:
    def __init__(self, out_dir: Path, cfg: LoggerConfig, run_name: str, config: dict, append: bool = False) -> None:
        self.jsonl = MetricsLog(out_dir / "metrics.jsonl", append=append)
        self.backend = cfg.backend
        self._wandb = self._tb = None
        if cfg.backend == "wandb":
            import wandb

            mode = cfg.wandb_mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self._wandb = wandb.init(project=cfg.project, name=run_name, dir=str(out_dir), mode=mode,
                                     config=json.loads(redact(json.dumps(config))), reinit="finish_previous")
        elif cfg.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard" / cfg.project))

    def log(self, metrics: dict) -> None:
        self.jsonl.log(metrics)  # masks secret values (rundir.MetricsLog)
        step = int(metrics["step"])
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
