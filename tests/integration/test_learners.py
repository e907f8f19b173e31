"""DeepSpeed learner ranks as Ray actors on CPU (2 ranks, gloo), ZeRO-2 and ZeRO-3.

Checks: log-probs equal transformers'; one PPO step equals a single-process full-batch
AdamW step (so the token-mean loss is exact across ranks and micro-batches); weight export
through the object store and through a gloo broadcast deliver the learner's exact weights;
the critic learns. One local Ray and one tiny model per module; the learner groups are
started once per module (each DeepSpeed start costs seconds on two cores).
"""
from __future__ import annotations

import socket

import pytest
import torch

from rlhf.actors.learner import CriticLearner, LearnerArgs, PolicyLearner, param_groups
from rlhf.actors.modeling import ValueModel, load_causal_lm, sequence_logprobs
from rlhf.actors.reference import ReferenceModel
from rlhf.actors.weights import BucketMeta, WeightGroup, bucket_from_bytes, unflatten_bucket
from rlhf.orchestrator.experience import Experience, SequenceBatch
from rlhf.orchestrator.rl import aggregate_loss, masked_mean, policy_loss
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus, sample_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

WORLD = 2
STAGES = (2, 3)
TIMEOUT_S = 300
TEMPERATURE = 0.7
BUCKET_BYTES = 256 * 1024  # several buckets for the ~0.4 M-parameter tiny model
# PPO step under test (shared by the learners and the single-process reference).
CLIP_EPS, DUAL_CLIP, ENTROPY_COEF, LOSS_AGG = 0.2, 3.0, 0.01, "token_mean"
# float32 everywhere; measured differences are ~1e-7 (sums in another order).
LOGPROB_ATOL = 1e-5
WEIGHT_ATOL = 1e-5


def _get(refs):
    return ray.get(refs, timeout=TIMEOUT_S)


def _args(model_dir, stage: int) -> LearnerArgs:
    # adam_eps 1e-5, not 1e-8: Adam's first step is lr * g / (|g| + eps), which turns float32
    # summation-order noise in near-zero gradients into weight differences up to lr / eps
    # times larger (measured 1e-4 with eps 1e-8); it also makes the step depend on the
    # gradient's scale, so the x world-size factor is checked by the weights as well.
    return LearnerArgs(model_path=str(model_dir), zero_stage=stage, lr=1e-3, weight_decay=0.1,
                       adam_betas=(0.9, 0.95), adam_eps=1e-5, grad_clip=1.0, micro_batch_size=2,
                       temperature=TEMPERATURE, seed=0)


def _launch(cls, args: LearnerArgs) -> list:
    remote_cls = ray.remote(num_cpus=1)(cls)
    ranks = [remote_cls.remote(args) for _ in range(WORLD)]
    host, port = _get(ranks[0].master_address.remote())
    _get([r.init_process_group.remote(host, port, i, WORLD) for i, r in enumerate(ranks)])
    return ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("learners") / "tiny",
                                  spec=TinyModelSpec(hidden_size=128, num_layers=2), seed=0)


@pytest.fixture(scope="module")
def experience(model_dir) -> Experience:
    """8 sequences; rank 0's rows have short responses and rank 1's long ones, so a
    per-rank (or per-micro-batch) token mean would weight tokens differently."""
    g = torch.Generator().manual_seed(1)
    prompt_lens = [3, 5, 4, 6, 3, 4, 5, 6]
    resp_lens = [2, 3, 1, 4, 12, 9, 13, 10]
    B, T = len(prompt_lens), max(p + r for p, r in zip(prompt_lens, resp_lens)) + 2
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    action_mask = torch.zeros(B, T - 1)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        input_ids[i, : p + r] = torch.randint(3, 300, (p + r,), generator=g)
        attention_mask[i, : p + r] = 1
        action_mask[i, p - 1 : p - 1 + r] = 1
    seq = SequenceBatch(input_ids, attention_mask, action_mask)
    with torch.no_grad():
        logp = sequence_logprobs(load_causal_lm(model_dir).eval(), seq, TEMPERATURE)
    noise = lambda scale: torch.randn(B, T - 1, generator=g) * scale * action_mask  # noqa: E731
    # old_logp off the current policy by ~0.3 nats: ratios leave [0.8, 1.2] on many tokens.
    return Experience(seq, old_logp=logp * action_mask + noise(0.3), ref_logp=logp * action_mask,
                      advantages=noise(1.0), returns=noise(1.0) + 0.5 * action_mask,
                      old_values=torch.zeros(B, T - 1))


@pytest.fixture(scope="module")
def policies(ray_local, model_dir) -> dict[int, list]:
    groups = {stage: _launch(PolicyLearner, _args(model_dir, stage)) for stage in STAGES}
    yield groups
    for ranks in groups.values():
        for r in ranks:
            ray.kill(r)


def _hf_logprobs(model_dir, state: dict, seq: SequenceBatch) -> torch.Tensor:
    model = load_causal_lm(model_dir).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, seq.input_ids[:, 1:, None]).squeeze(-1)
    return logp * seq.action_mask


@pytest.mark.parametrize("stage", STAGES)
def test_compute_logprobs_equal_plain_transformers(policies, model_dir, experience, stage):
    ranks = policies[stage]
    seq = experience.sequences
    got = torch.cat(_get([r.compute_logprobs.remote(part) for r, part in zip(ranks, seq.split(WORLD))]))
    state = _get([r.full_state_dict.remote() for r in ranks])[0]
    want = _hf_logprobs(model_dir, state, seq)
    assert got.shape == seq.action_mask.shape
    assert (got[seq.action_mask.bool()] < -0.1).all()  # real log-probs, not zeros
    assert (got[~seq.action_mask.bool()] == 0).all()
    assert (got - want).abs().max() < LOGPROB_ATOL
    # The reference actor follows the same convention (initial weights: compare with those).
    ref = ReferenceModel(str(model_dir), micro_batch_size=3).compute_logprobs(seq, TEMPERATURE)
    init = _hf_logprobs(model_dir, load_causal_lm(model_dir).state_dict(), seq)
    assert (ref - init).abs().max() < LOGPROB_ATOL


def _reference_step(model_dir, exp: Experience, per_rank_mean: bool = False):
    """One full-batch AdamW step in this process; returns (loss, grad norm, new weights).
    per_rank_mean=True is the classic mistake (each rank divides by its own token count)."""
    args = _args(model_dir, 0)
    model = load_causal_lm(model_dir).train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=args.adam_betas,
                            eps=args.adam_eps, weight_decay=args.weight_decay)
    parts = exp.split(WORLD) if per_rank_mean else [exp]
    total = 0.0
    for part in parts:
        mask = part.sequences.action_mask
        n_tok, n_seq = (None, None) if per_rank_mean else (int(mask.sum()), len(part))
        logp, entropy = sequence_logprobs(model, part.sequences, TEMPERATURE, with_entropy=True)
        loss, _ = policy_loss(logp, part.old_logp, part.advantages, mask, CLIP_EPS, DUAL_CLIP, LOSS_AGG, n_tok, n_seq)
        loss = (loss - ENTROPY_COEF * aggregate_loss(entropy, mask, LOSS_AGG, n_tok, n_seq)) / len(parts)
        loss.backward()
        total += float(loss.detach())
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
    opt.step()
    return total, norm, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_step_equals_single_process_full_batch_step(policies, model_dir, experience):
    initial = load_causal_lm(model_dir).state_dict()
    num_tokens, num_seqs = int(experience.sequences.action_mask.sum()), len(experience)
    ref_loss, ref_norm, ref_state = _reference_step(model_dir, experience)
    _, wrong_norm, wrong_state = _reference_step(model_dir, experience, per_rank_mean=True)
    # The checks below can tell: a per-rank token mean gives another gradient and update
    # (and a loss without the x world-size factor would halve the grad norm).
    assert abs(wrong_norm - ref_norm) > 10 * 1e-4 * ref_norm
    assert max((wrong_state[n] - ref_state[n]).abs().max() for n in ref_state) > 100 * WEIGHT_ATOL

    states = {}
    for stage in STAGES:
        ranks = policies[stage]
        stats = _get([r.train_step.remote(shard, CLIP_EPS, DUAL_CLIP, ENTROPY_COEF, LOSS_AGG, num_tokens,
                                          num_seqs, 1) for r, shard in zip(ranks, experience.split(WORLD))])
        states[stage] = _get([r.full_state_dict.remote() for r in ranks])[0]
        mean_loss = sum(s["policy/loss"] for s in stats) / WORLD
        assert mean_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), stage
        assert stats[0]["policy/grad_norm"] == pytest.approx(ref_norm, rel=1e-4), stage
        assert stats[0]["policy/lr"] == pytest.approx(1e-3)
        assert 0 < stats[0]["policy/clipfrac"] < 1 and stats[1]["policy/approx_kl"] > 0
        assert stats[0]["policy/entropy"] > 0
        assert set(states[stage]) == set(ref_state)

    moved = max((ref_state[n] - initial[n]).abs().max() for n in ref_state)
    assert moved > 5e-4  # the step changed the weights (lr 1e-3, Adam's first step ~ lr)
    for name, want in ref_state.items():
        for stage in STAGES:
            assert (states[stage][name] - want).abs().max() < WEIGHT_ATOL, (stage, name)
        assert (states[2][name] - states[3][name]).abs().max() < WEIGHT_ATOL, name


@pytest.mark.parametrize("stage", STAGES)
def test_object_store_buckets_reassemble_the_learners_weights(policies, model_dir, tmp_path, stage):
    ranks = policies[stage]
    refs = _get([r.export_weight_buckets.remote(BUCKET_BYTES) for r in ranks])
    assert refs[1] == [] and len(refs[0]) > 1
    received = {}
    for data in _get(refs[0]):
        received.update(bucket_from_bytes(data))
    state = _get([r.full_state_dict.remote() for r in ranks])[0]
    hf_names = set(load_causal_lm(model_dir).state_dict())
    assert set(received) == set(state) == hf_names  # vLLM's names, lm_head included (untied)
    assert "model.layers.0.self_attn.q_proj.weight" in received
    for name, t in state.items():
        assert received[name].dtype == t.dtype and torch.equal(received[name], t), name
    # save_pretrained gathers under ZeRO-3 too and writes a loadable HF folder.
    _get([r.save_pretrained.remote(str(tmp_path / "ckpt")) for r in ranks])
    saved = load_causal_lm(tmp_path / "ckpt").state_dict()
    assert all(torch.equal(saved[n], t) for n, t in state.items())


@pytest.mark.parametrize("stage", STAGES)
def test_gloo_broadcast_delivers_identical_tensors(policies, stage):
    ranks = policies[stage]
    metas = [BucketMeta.from_dict(m) for m in _get(ranks[0].weight_bucket_metas.remote(BUCKET_BYTES))]
    port = _free_port()
    pending = [r.broadcast_weights.remote("127.0.0.1", port, 2, BUCKET_BYTES, "gloo") for r in ranks]
    group = WeightGroup("127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=TIMEOUT_S)
    received = {}
    for meta in metas:
        flat = torch.empty(meta.total_bytes, dtype=torch.uint8)
        group.broadcast(flat, src=0)
        received.update({n: t.clone() for n, t in unflatten_bucket(flat, meta)})
    _get(pending)
    state = _get([r.full_state_dict.remote() for r in ranks])[0]
    assert len(metas) > 1 and set(received) == set(state)
    for name, t in state.items():
        assert torch.equal(received[name], t), name
    checksums = _get([r.weight_checksums.remote() for r in ranks])[0]
    assert checksums == {n: float(t.double().sum()) for n, t in received.items()}


def test_critic_values_and_training(ray_local, model_dir, experience, tmp_path):
    ranks = _launch(CriticLearner, _args(model_dir, 3))
    try:
        seq, mask = experience.sequences, experience.sequences.action_mask.bool()
        num_tokens, num_seqs = int(mask.sum()), len(experience)

        def values():
            return torch.cat(_get([r.compute_values.remote(p) for r, p in zip(ranks, seq.split(WORLD))]))

        def fit_error(v):
            return float(masked_mean((v - experience.returns) ** 2, mask))

        v0 = values()
        assert v0.shape == mask.shape and (v0 == 0).all()  # zero-initialised value head
        losses = []
        for _ in range(6):
            stats = _get([r.train_step.remote(shard, None, "seq_mean_token_mean", num_tokens, num_seqs, 1)
                          for r, shard in zip(ranks, experience.split(WORLD))])
            losses.append(sum(s["critic/loss"] for s in stats) / WORLD)
            assert stats[0]["critic/grad_norm"] > 0
        v1 = values()
        assert all(b < a for a, b in zip(losses, losses[1:])), losses  # measured 0.43 -> 0.24
        assert losses[-1] < 0.7 * losses[0], losses
        assert fit_error(v1) < 0.7 * fit_error(v0)
        assert (v1[~mask] == 0).all() and (v1[mask] != 0).all()
        # Clipped loss path: with old values 0 and clip 0.05 the clip is active.
        stats = _get([r.train_step.remote(shard, 0.05, "token_mean", num_tokens, num_seqs, 1)
                      for r, shard in zip(ranks, experience.split(WORLD))])
        assert stats[0]["critic/clipfrac"] > 0
        # Saved critic (ZeRO-3 gathered) reloads with its value head: the reward-model hook.
        _get([r.save_pretrained.remote(str(tmp_path / "critic")) for r in ranks])
        reloaded = ValueModel.from_pretrained(tmp_path / "critic").eval()
        with torch.no_grad():
            want = reloaded.values(seq) * mask
        assert (values() - want).abs().max() < LOGPROB_ATOL
    finally:
        for r in ranks:
            ray.kill(r)


def test_tied_embeddings_export_names_and_logprobs(tmp_path):
    """No Ray needed: tied LM head is exported once (as the input embedding), and
    sequence_logprobs uses it correctly."""
    path = build_tiny_from_corpus(sample_corpus(), tmp_path / "tied", spec=TinyModelSpec(tie_word_embeddings=True))
    learner = PolicyLearner(LearnerArgs(model_path=str(path)))
    learner.model = load_causal_lm(path).eval()
    names = [n for n, _ in learner._named_weights()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    seq = SequenceBatch(ids, torch.ones_like(ids), torch.ones(2, 8))
    with torch.no_grad():
        got = sequence_logprobs(learner.model, seq)
        want = torch.log_softmax(learner.model(input_ids=ids).logits[:, :-1].float(), -1)
    assert (got - want.gather(-1, ids[:, 1:, None]).squeeze(-1)).abs().max() < LOGPROB_ATOL


def _train(ranks, experience) -> list[dict]:
    num_tokens, num_seqs = int(experience.sequences.action_mask.sum()), len(experience)
    return _get([r.train_step.remote(shard, CLIP_EPS, DUAL_CLIP, ENTROPY_COEF, LOSS_AGG, num_tokens, num_seqs, 1)
                 for r, shard in zip(ranks, experience.split(len(ranks)))])


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("stage", STAGES)
def test_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(policies, experience, stage):
    ranks = policies[stage]
    before = _get([r.full_state_dict.remote() for r in ranks])[0]
    _get(ranks[1].inject_nonfinite.remote(1))  # only rank 1's loss is NaN
    stats = _train(ranks, experience)
    assert [s["policy/nonfinite_skips"] for s in stats] == [1.0, 1.0]
    after = _get([r.full_state_dict.remote() for r in ranks])[0]
    assert _max_diff(before, after) == 0.0  # no rank stepped
    assert all(torch.isfinite(t).all() for t in after.values())
    stats = _train(ranks, experience)  # the next update is applied normally
    assert [s["policy/nonfinite_skips"] for s in stats] == [0.0, 0.0]
    assert _max_diff(after, _get([r.full_state_dict.remote() for r in ranks])[0]) > 1e-5


def test_nonfinite_guard_without_zero(ray_local, model_dir, experience):
    """ZeRO stage 0 has no overflow check of its own: the guard clears the gradients."""
    (rank,) = ranks = [ray.remote(num_cpus=1)(PolicyLearner).remote(_args(model_dir, 0))]
    try:
        host, port = _get(rank.master_address.remote())
        _get(rank.init_process_group.remote(host, port, 0, 1))
        before = _get(rank.full_state_dict.remote())
        _get(rank.inject_nonfinite.remote(1))
        assert _train(ranks, experience)[0]["policy/nonfinite_skips"] == 1.0
        assert _max_diff(before, _get(rank.full_state_dict.remote())) == 0.0
        assert _train(ranks, experience)[0]["policy/nonfinite_skips"] == 0.0
        after = _get(rank.full_state_dict.remote())
        assert all(torch.isfinite(t).all() for t in after.values()) and _max_diff(before, after) > 1e-5
    finally:
        ray.kill(rank)


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_restores_weights_optimizer_and_schedule(policies, experience, tmp_path, stage):
    """Save, train two steps, load, train the same two steps: identical weights and stats
    (Adam moments, step count and LR schedule come back, not just the weights)."""
    ranks = policies[stage]
    _get([r.save_checkpoint.remote(str(tmp_path / "ckpt")) for r in ranks])
    first = [_train(ranks, experience) for _ in range(2)]
    trained = _get([r.full_state_dict.remote() for r in ranks])[0]
    _get([r.load_checkpoint.remote(str(tmp_path / "ckpt")) for r in ranks])
    again = [_train(ranks, experience) for _ in range(2)]
    assert _max_diff(trained, _get([r.full_state_dict.remote() for r in ranks])[0]) < 1e-7
    for a, b in zip(first, again):
        assert a[0]["policy/loss"] == pytest.approx(b[0]["policy/loss"], abs=1e-7)
        assert a[0]["policy/grad_norm"] == pytest.approx(b[0]["policy/grad_norm"], rel=1e-6)
