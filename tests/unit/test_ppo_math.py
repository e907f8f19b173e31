"""The driver's advantage step (pure function) and prompt loading, with hand-worked values."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.experience import Samples, to_sequence_batch
from rlhf.orchestrator.ppo.trainer import kl_abort_reason, make_advantages
from rlhf.orchestrator.data.prompts import prompt_batches, read_dialogues


def test_gae_with_kl_shaped_rewards_by_hand():
    # One sequence, two response tokens. k1 KL = logp - ref = [0.1, 0.2]; beta = 0.5
    # rewards = [-0.05, -0.1 + score 1] = [-0.05, 0.9]; V = [0.5, 0.4]; gamma = lam = 1
    # A_1 = 0.9 + 0 - 0.4 = 0.5;  A_0 = -0.05 + 0.4 - 0.5 + A_1 = 0.35;  R = A + V = [0.85, 0.9]
    out = make_advantages("gae", torch.tensor([1.0]), torch.tensor([[0.1, 0.2]]), torch.zeros(1, 2),
                          torch.tensor([[0.5, 0.4]]), torch.ones(1, 2), kl_coef=0.5, kl_estimator="k1",
                          gamma=1.0, lam=1.0, n=1, whiten=False)
    assert_close(out.advantages, torch.tensor([[0.35, 0.5]]), atol=1e-6, rtol=0)
    assert_close(out.returns, torch.tensor([[0.85, 0.9]]), atol=1e-6, rtol=0)
    assert_close(out.kl, torch.tensor([[0.1, 0.2]]), atol=1e-7, rtol=0)


def test_rloo_folds_sequence_kl_into_the_score():
    # Group of n=2. KL sums: row 0: 0.1 + 0.1 = 0.2, row 1: 0. beta = 1 -> scores' = [0.8, 0]
    # RLOO: A_i = r_i - mean(others) = [0.8 - 0, 0 - 0.8] = [0.8, -0.8], on every response token.
    logp = torch.tensor([[0.1, 0.1], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = make_advantages("rloo", torch.tensor([1.0, 0.0]), logp, torch.zeros(2, 2), None, mask,
                          kl_coef=1.0, kl_estimator="k1", gamma=1.0, lam=1.0, n=2, whiten=False)
    assert_close(out.advantages, torch.tensor([[0.8, 0.8], [-0.8, 0.0]]), atol=1e-6, rtol=0)


def test_sequence_batch_layout():
    # Prompt [5, 6], response [7, 8]: targets are ids[1:] = [6, 7, 8]; response targets at 1, 2.
    s = Samples([[5, 6], [9]], [[7, 8], [3]], [[-0.1, -0.2], [-0.3]], [True, False], [0, 1])
    b = to_sequence_batch(s, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [9, 3, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.action_mask.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_dialogue_jsonl_errors_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(BadInput, match=r"d\.jsonl:3: malformed dialogue"):
        read_dialogues(path)
    path.write_text(json.dumps(good) + "\nnot json\n")
    with pytest.raises(BadInput, match=r"d\.jsonl:2"):
        read_dialogues(path)
    path.write_text("\n")
    with pytest.raises(BadInput, match="empty dataset"):
        read_dialogues(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_dialogues(path) == [good["messages"]]


def test_prompt_batches_cover_every_prompt_once_per_epoch():
    stream = prompt_batches(6, per_step=3, seed=0)
    first_epoch = next(stream) + next(stream)
    assert sorted(first_epoch) == list(range(6))


def test_kl_guard_stops_only_past_ppo_abort_kl():
    # Two replies with per-token KL sums 60.2 and 62.4 nats: kl/mean = 61.3 > 50 -> stop.
    kl_mean = (60.2 + 62.4) / 2
    assert kl_abort_reason(2, kl_mean, 50.0, 1e-3) == (
        "ppo step 2: KL to the reference reached 61.3 nats per reply (ppo.abort_kl = 50): the policy has left "
        "its starting model; lower policy.lr (now 0.001) or raise ppo.abort_kl")
    assert kl_abort_reason(2, 50.0, 50.0, 1e-3) is None  # at the limit: go on (the guard is "exceeds")
    assert kl_abort_reason(2, 7.7, 50.0, 1e-3) is None  # the tiny runs' highest KL seen
    assert kl_abort_reason(2, 1e6, None, 1e-3) is None  # ppo.abort_kl null: never
    assert kl_abort_reason(2, float("nan"), 50.0, 1e-3) is None  # the non-finite guard's business
    assert "reached inf nats" in kl_abort_reason(3, float("inf"), 50.0, 1e-5)
    assert "(now 1e-05)" in kl_abort_reason(3, 51.0, 50.0, 1e-5)


def test_sampler_old_logprobs_fall_back_to_the_learner_past_the_gap(capsys):
    """ppo.old_logprobs=sampler: the first mini-batch's measured gap (mean over ranks) decides;
    past ppo.old_logprobs_max_gap the run uses the learner's forward from the next step on."""
    from types import SimpleNamespace

    from rlhf.orchestrator.config import build_config
    from rlhf.orchestrator.ppo.trainer import PPOTrainer

    cfg = build_config({"ppo": {"old_logprobs": "sampler", "old_logprobs_max_gap": 1e-3}})
    trainer = SimpleNamespace(cfg=cfg, old_logprobs="sampler")
    check = PPOTrainer._check_sampler_gap
    assert check(trainer, 1, [{"policy/old_logprob_gap": 2e-7}, {"policy/old_logprob_gap": 4e-7}]) == pytest.approx(3e-7)
    assert trainer.old_logprobs == "sampler" and capsys.readouterr().out == ""
    assert check(trainer, 2, [{"policy/old_logprob_gap": 1e-4}, {"policy/old_logprob_gap": 3e-3}]) == pytest.approx(1.55e-3)
    assert trainer.old_logprobs == "learner"
    assert "ppo step 2: the engines' log-probs differ from the learner's by 1.55e-03" in capsys.readouterr().out
    assert check(trainer, 3, [{"policy/loss": 0.1}]) is None  # learner old log-probs: nothing measured
    nan = SimpleNamespace(cfg=cfg, old_logprobs="sampler")
    check(nan, 1, [{"policy/old_logprob_gap": float("nan")}])
    assert nan.old_logprobs == "learner"  # a NaN gap is no evidence the engines agree
