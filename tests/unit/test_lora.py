"""LoRA on the learners (rlhf.actors.lora): only the adapters train, the optimizer holds only
their states, merged weights reproduce the adapted model, a target that matches nothing is
a BadInput naming the key, and the HF export is a plain folder with the adapters merged.

Tiny models; one in-process DeepSpeed ZeRO-2 learner rank (world size 1, gloo) per module.
Run: .venv/bin/pytest tests/unit/test_lora.py -q
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.actors.learner import CriticLearner, LearnerArgs, PolicyLearner, param_groups
from rlhf.actors.lora import LoraArgs, apply_lora, check_targets_for, export_plan, merged_state_dict, sync_names
from rlhf.actors.modeling import ValueModel, load_causal_lm, sequence_logprobs
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.experience import Experience, SequenceBatch
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_model, sample_corpus, train_tokenizer

LORA = LoraArgs(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"), key="policy.lora")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(sample_corpus(50), vocab_size=384)
    # Tied embeddings, as SmolLM2: the head is the embedding under a second name.
    return build_tiny_model(TinyModelSpec(hidden_size=128, num_layers=2, tie_word_embeddings=True), tokenizer,
                            tmp_path_factory.mktemp("lora") / "tiny", seed=0)


def _randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (merged == base); give it values so merging is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ids() -> torch.Tensor:
    return torch.tensor([[3, 17, 44, 9, 120, 7, 33, 250, 5, 61], [8, 8, 90, 14, 2, 71, 19, 4, 300, 11]])


def test_only_adapters_train_and_the_optimizer_holds_only_theirs(model_dir):
    model = apply_lora(load_causal_lm(model_dir), LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj", "o_proj"}
    groups = param_groups(model, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    logp = sequence_logprobs(model, SequenceBatch(_ids(), torch.ones_like(_ids()), torch.ones(2, 9)))
    logp.sum().backward()
    optimizer.step()
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert sum(t.numel() for t in state) == 2 * n_adapter < n_total / 10  # exp_avg + exp_avg_sq


def test_value_head_trains_whole_with_adapters_on_the_backbone(model_dir):
    critic = apply_lora(ValueModel.from_pretrained(model_dir), LORA, trainable=("value_head",))
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trainable
    assert all(n.startswith("value_head.") or ".lora_" in n for n in trainable)
    plan = export_plan(critic, list(critic.named_parameters()))
    assert {n for n, _, _ in plan} == set(ValueModel.from_pretrained(model_dir).state_dict())


def test_merged_weights_reproduce_the_adapted_model_and_leave_it_unchanged(model_dir):
    model = apply_lora(load_causal_lm(model_dir), LORA).eval()
    _randomise_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(_ids()).logits
    merged = merged_state_dict(model)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert set(merged) == set(plain.state_dict())  # base names only, no lora_ / base_layer keys
    plain.load_state_dict(merged)
    with torch.no_grad():
        got = plain(_ids()).logits
    assert (got - expected).abs().max() < 1e-5
    assert (got - AutoModelForCausalLM.from_pretrained(model_dir).eval()(_ids()).logits).abs().max() > 1e-2
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_sync_sends_adapted_layers_and_their_fused_siblings_only(model_dir):
    model = apply_lora(load_causal_lm(model_dir), LoraArgs(4, 8.0, 0.0, ("q_proj", "down_proj")))
    names = sync_names(export_plan(model, list(model.named_parameters())))
    per_layer = {n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")}
    # q_proj lives fused with k/v in vLLM (weights and the tiny Qwen2's biases); down_proj alone.
    assert per_layer == {f"self_attn.{m}.{t}" for m in ("q_proj", "k_proj", "v_proj") for t in ("weight", "bias")} \
        | {"mlp.down_proj.weight"}
    assert len(names) == 2 * len(per_layer)


def test_targets_that_match_nothing_are_bad_input_naming_the_key(model_dir):
    with pytest.raises(BadInput) as err:
        check_targets_for(model_dir, LoraArgs(4, 8.0, 0.0, ("foo", "attn"), key="critic.lora"))
    message = str(err.value)
    assert message.startswith("critic.lora.target_modules: ['foo', 'attn'] match no module of")
    assert "q_proj" in message and "down_proj" in message and "\n" not in message
    check_targets_for(model_dir, LORA)  # a matching target passes
    with pytest.raises(BadInput, match="policy.lora.target_modules"):
        apply_lora(load_causal_lm(model_dir), LoraArgs(4, 8.0, 0.0, ("lm_head",), key="policy.lora"))


# ---- one real DeepSpeed ZeRO-2 learner rank, in this process ------------------------------
@pytest.fixture(scope="module")
def process_group():
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _learner(cls, model_dir, lora: LoraArgs | None = LORA):
    learner = cls(LearnerArgs(model_path=str(model_dir), zero_stage=2, lr=1e-2, micro_batch_size=2, lora=lora))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if torch.distributed.is_initialized():  # later learners reuse the group the first one made
        learner.rank, learner.world_size = 0, 1
        learner._build_engine()
    else:
        learner.init_process_group("127.0.0.1", port, 0, 1)
    return learner


def _experience() -> Experience:
    ids = _ids()
    mask = torch.ones(2, 9)
    g = torch.Generator().manual_seed(3)
    return Experience(SequenceBatch(ids, torch.ones_like(ids), mask), old_logp=torch.full((2, 9), -6.0),
                      ref_logp=torch.full((2, 9), -6.0), advantages=torch.randn(2, 9, generator=g),
                      returns=torch.randn(2, 9, generator=g), old_values=torch.zeros(2, 9))


def _train(learner: PolicyLearner, exp: Experience) -> dict:
    return learner.train_step(exp, clip_eps=10.0, dual_clip=None, entropy_coef=0.0, loss_agg="token_mean",
                              num_tokens=18, num_seqs=2)


@pytest.fixture(scope="module")
def policy(model_dir, process_group):
    return _learner(PolicyLearner, model_dir)


def test_deepspeed_learner_trains_adapters_only_and_exports_merged(policy, model_dir, tmp_path):
    n_adapter = sum(p.numel() for n, p in policy.model.named_parameters() if ".lora_" in n)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if ".lora_" not in n}
    _train(policy, _experience())
    # ZeRO-2 keeps Adam's two moments of the flat fp32 partition: the adapters' elements only.
    assert 2 * n_adapter <= policy.optimizer_state_numel() <= 2 * n_adapter + 64
    assert all(torch.equal(base[n], p) for n, p in policy.model.named_parameters() if ".lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in policy.model.named_parameters() if "lora_B" in n)

    # Engines get merged weights, only those of the adapted layers (and q/k/v siblings).
    sent = set(policy.weight_checksums())
    assert sent and all(".self_attn." in n for n in sent) and not any(".lora_" in n for n in sent)

    # The HF export merges: a plain folder whose log-probs are the learner's.
    policy.save_pretrained(str(tmp_path / "hf"))
    plain = load_causal_lm(tmp_path / "hf").eval()
    assert not any(".lora_" in n or "base_layer" in n for n in plain.state_dict())
    seq = _experience().sequences
    with torch.no_grad():
        exported = sequence_logprobs(plain, seq)
    assert (exported - policy.compute_logprobs(seq)).abs().max() < 1e-5
    assert (exported - sequence_logprobs(load_causal_lm(model_dir).eval(), seq)).abs().max() > 1e-3


def test_hf_rollout_engine_takes_the_partial_merged_sync(policy, model_dir):
    """The HF rollout engine (rollout.backend: hf) loads only the adapted layers' merged
    weights and then scores like the learner (vLLM: tests/integration/test_lora_smollm2.py)."""
    from rlhf.actors.rollout_hf import HFRolloutEngine
    from rlhf.actors.weights import bucket_to_bytes

    _train(policy, _experience())
    engine = HFRolloutEngine(str(model_dir), dtype="float32")
    buckets = [bucket_to_bytes(b) for b in policy._gathered_buckets(64 * 1024, sync=True)]
    assert engine.load_weight_buckets(buckets) == len(policy.weight_checksums())
    seq = _experience().sequences
    learner = policy.compute_logprobs(seq)
    got = torch.tensor(engine.prompt_logprobs(seq.input_ids.tolist()))
    assert (got - learner).abs().max() < 1e-5


def test_lora_checkpoint_leaves_the_base_out_and_resumes(policy, model_dir, tmp_path):
    policy.save_checkpoint(str(tmp_path / "ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    weights = [n for n, t in saved["module"].items() if t.numel() > 64]  # (rotary buffers are tiny)
    assert weights and all(".lora_" in n for n in weights)  # no base weight, no tied lm_head either
    after_one = [_train(policy, _experience()) for _ in range(2)]
    trained = policy.full_state_dict()
    fresh = _learner(PolicyLearner, model_dir)
    fresh.load_checkpoint(str(tmp_path / "ckpt"))
    again = [_train(fresh, _experience()) for _ in range(2)]
    assert max((trained[n] - t).abs().max().item() for n, t in fresh.full_state_dict().items()) < 1e-7
    assert [a["policy/loss"] for a in after_one] == pytest.approx([b["policy/loss"] for b in again], abs=1e-7)


def test_critic_with_lora_exports_backbone_and_value_head(policy, model_dir, tmp_path):
    critic = _learner(CriticLearner, model_dir, LoraArgs(4, 8.0, 0.0, ("q_proj",), key="critic.lora"))
    n_train = sum(p.numel() for p in critic.model.parameters() if p.requires_grad)
    critic.train_step(_experience(), value_clip=None, loss_agg="token_mean", num_tokens=18, num_seqs=2)
    assert 2 * n_train <= critic.optimizer_state_numel() <= 2 * n_train + 64
    critic.save_pretrained(str(tmp_path / "critic"))
    reloaded = ValueModel.from_pretrained(tmp_path / "critic").eval()
    seq = _experience().sequences
    with torch.no_grad():
        assert (reloaded.values(seq) - critic.compute_values(seq)).abs().max() < 1e-5


def test_reward_model_export_merges_and_keeps_the_score_head(model_dir, tmp_path):
    """The RM worker's path: adapters on the backbone, the score head trains whole, and the
    merged state saved by the plain class scores exactly like the adapted model."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.orchestrator.models.scoring import last_token_scores

    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = 0
    apply_lora(rm, LORA, trainable=("score",))
    assert {n for n, p in rm.named_parameters() if p.requires_grad and ".lora_" not in n} == {"score.weight"}
    _randomise_adapters(rm, seed=1)
    rm.eval()
    ids, mask = _ids(), torch.ones_like(_ids())
    with torch.no_grad():
        expected = last_token_scores(rm, ids, mask)
    rm.save_pretrained(str(tmp_path / "rm"), state_dict=merged_state_dict(rm))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()
    assert not any(".lora_" in n or "base_layer" in n for n in plain.state_dict())
    with torch.no_grad():
        assert (last_token_scores(plain, ids, mask) - expected).abs().max() < 1e-5
