"""`rlhf eval`: how often checkpoint A's replies beat checkpoint B's, as the judge scores them.

    rlhf eval CONFIG A B [overrides] [--prompts FILE] [--samples N] [--out FILE.json]

Both model folders answer the same prompts with the same sampling seed (identical models
give identical replies), `samples` replies per prompt; a prompt's score is the mean of its
replies' judge scores, and A wins a prompt when its score is higher (a tie counts half).
The win rate comes with a percentile-bootstrap confidence interval over prompts, so a
difference that a few lucky prompts explain is visible as an interval around 50 %.

Prompts: `--prompts FILE` (JSONL of {"messages": [...]} ending with a user turn; a trailing
assistant reply is dropped), else the config's held-out eval prompts (data.eval, or the
task's; pipeline.eval_prompts of them). The judge is pipeline.judge, else the labeler.
On one CPU machine, tiny models:

    rlhf eval configs/quickstart.yaml runs/quickstart/round2/ppo/checkpoints/final/policy \
        runs/quickstart/sft/checkpoint pipeline.eval_prompts=32 --samples 2 --out runs/eval.json

Generation runs in this process (transformers, on a GPU when there is one); no Ray.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf.orchestrator.config import DataSourceConfig, ExperimentConfig
from rlhf.orchestrator.errors import BadInput, StageFailed
from rlhf.orchestrator.recipe.report import prompt_scores
from rlhf.orchestrator.run.lock import lock_out_file


def win_rate_ci(a: list[float], b: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Per-prompt scores of A and B -> win rate of A with a percentile-bootstrap interval.

    win rate = mean_i(1[a_i > b_i] + 0.5 * 1[a_i == b_i]); the interval is the (1-level)/2 and
    (1+level)/2 quantiles of that mean over `n_boot` resamples of the prompts with replacement
    (seeded, so the same scores give the same interval)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need as many scores for A as for B, at least one (got {len(a)} and {len(b)})")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    outcome = (a_arr > b_arr) + 0.5 * (a_arr == b_arr)  # [n] 1 win, 0.5 tie, 0 loss
    n = len(outcome)
    resamples = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [n_boot, n] prompt indices
    means = outcome[resamples].mean(axis=1)  # [n_boot]
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    wins, ties = int((a_arr > b_arr).sum()), int((a_arr == b_arr).sum())
    return {"win_rate": float(outcome.mean()), "ci_low": float(low), "ci_high": float(high), "n": n,
            "wins": wins, "ties": ties, "losses": n - wins - ties}


def _check_model_dir(path: str, which: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise BadInput(f"checkpoint {which} {path}: no such folder")
    if not (folder / "config.json").is_file():
        raise BadInput(f"checkpoint {which} {path}: not a model folder (no config.json)")


def _prompts(cfg: ExperimentConfig, task, prompts_file: str | None) -> tuple[list[list[dict]], str]:
    """The conversations to answer (each ending with a user turn) and where they came from."""
    if prompts_file is None:
        from rlhf.orchestrator.data.prompts import load_eval_prompts

        return load_eval_prompts(cfg, task, cfg.pipeline.eval_prompts), "config eval prompts"
    from rlhf.orchestrator.data.prompts import drop_reply
    from rlhf.orchestrator.data.sources import load_dialogues

    path = Path(prompts_file).resolve()  # a command-line path: relative to where rlhf runs
    if not path.exists():
        raise BadInput(f"--prompts {prompts_file}: no such file")
    # A trailing assistant reply (a demonstration file) is dropped: the models write that turn.
    prompts = [drop_reply(d) for d in load_dialogues([DataSourceConfig(path=str(path))], "--prompts", cfg.seed)]
    for i, messages in enumerate(prompts):
        if not messages or messages[-1]["role"] != "user":
            raise BadInput(f"--prompts {prompts_file}: conversation {i + 1} does not end with a user turn "
                           "(or an assistant reply after one)")
    return prompts, str(prompts_file)


def judge_label(cfg: ExperimentConfig) -> str:
    """`task (arithmetic)`, `reward_model (runs/x/rm)`: who scored, for the printed line."""
    judge = cfg.pipeline.judge or cfg.labeler
    detail = cfg.data.task if judge.kind == "task" else (judge.target or judge.path)
    return f"{judge.kind} ({detail})" if detail else judge.kind


def _check_out(out: str | None) -> None:
    """An --out that cannot be written fails before minutes of generation, not after."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise BadInput(f"--out {out}: is a folder; give a file name such as eval.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"--out {out}: cannot create its folder ({err.strerror or type(err).__name__})") from None
    lock_out_file(path)  # a second `rlhf eval --out` of the same file stops here (exit 2)


def _scores(name: str, model_dir: str, prompts, judge, samples: int, cfg: ExperimentConfig) -> list[float]:
    """prompt_scores, with a failure (a model that does not load, a judge that raises) as one
    line naming the checkpoint and the phase (exit 1)."""
    try:
        return prompt_scores(model_dir, prompts, judge, samples, cfg.rollout.max_new_tokens,
                             cfg.rollout.temperature, cfg.seed)
    except Exception as err:  # noqa: BLE001 - one line, exit 1 (errors.py)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise StageFailed(f"eval: checkpoint {name.upper()} ({model_dir}): loading, generating or judging "
                          f"failed: {type(err).__name__}: {first}"[:500]) from err


def eval_inputs(cfg: ExperimentConfig, a: str, b: str, prompts_file: str | None, samples: int | None,
                out: str | None) -> tuple[int, object, list[list[dict]], str, object]:
    """Everything checked before a model loads: (samples, task, prompts, their source, judge)."""
    from rlhf.orchestrator.data.labelers import build_judge
    from rlhf.orchestrator.tasks import load_task

    _check_model_dir(a, "A")
    _check_model_dir(b, "B")
    _check_out(out)
    task = load_task(cfg.data.task)
    prompts, source = _prompts(cfg, task, prompts_file)
    if not prompts:
        raise BadInput(f"{prompts_file or 'pipeline.eval_prompts'}: no prompts to evaluate on")
    return samples or cfg.pipeline.eval_samples, task, prompts, source, build_judge(cfg, task)


def run_eval(cfg: ExperimentConfig, a: str, b: str, prompts_file: str | None = None, samples: int | None = None,
             out: str | None = None) -> dict:
    """Scores A's and B's replies with the judge and returns win_rate_ci's dict plus what was
    compared (paths, prompts, samples, judge, per-prompt scores); writes it as JSON to `out`."""
    samples, _, prompts, source, judge = eval_inputs(cfg, a, b, prompts_file, samples, out)
    # One seed for both: the only difference between the two reply sets is the model.
    scores = {name: _scores(name, model_dir, prompts, judge, samples, cfg) for name, model_dir in (("a", a), ("b", b))}
    result = {**win_rate_ci(scores["a"], scores["b"], seed=cfg.seed), "level": 0.95, "a": str(a), "b": str(b),
              "prompts": source, "samples": samples, "judge": judge_label(cfg),
              "mean_score_a": float(np.mean(scores["a"])), "mean_score_b": float(np.mean(scores["b"])),
              "scores_a": scores["a"], "scores_b": scores["b"]}
    write_result(out, result)
    return result


def write_result(out: str | None, result: dict) -> None:
    """The result as JSON in `out` (nothing when None); a failed write is one line naming --out."""
    from rlhf.orchestrator.run.rundir import write_atomic

    if out is None:
        return
    try:
        write_atomic(Path(out), json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise BadInput(f"--out {out}: cannot be written ({err.strerror or type(err).__name__})") from None


def format_result(result: dict) -> str:
    """The one line `rlhf eval` prints."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    return (f"A over B: win rate {pct(result['win_rate'])} % ({round(100 * result['level'])} % CI "
            f"{pct(result['ci_low'])}-{pct(result['ci_high'])} %), n={result['n']} prompts x "
            f"{result['samples']} samples, {result['ties']} ties; judge: {result['judge']}")
