"""End to end: a tiny GRPO run on an easy toy reward raises the mean reward of sampled completions,
in the GRPO form and in the Dr. GRPO / DAPO variants, and leaves the reference model untouched."""
import copy
import json
import random

import pytest
import torch

import data
import moe
import nanor1
from nanor1 import enc

pytestmark = [pytest.mark.rmsnorm_rope, pytest.mark.gate, pytest.mark.balance, pytest.mark.mla_absorb,
              pytest.mark.advantages, pytest.mark.grpo_loss, pytest.mark.rewards]

MAX_NEW = 8


def sevens(text, problem):
    """The toy reward: the share of characters that are '7'."""
    return sum(c == "7" for c in text) / max(len(text), 1)


def tiny_model(seed=0):
    cfg = moe.ModelConfig(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_heads=2, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                          n_activated_experts=2, vocab_size=enc.n_vocab)
    torch.manual_seed(seed)
    return moe.Transformer(cfg)


@torch.no_grad()
def mean_toy_reward(model, n=256, seed=0):
    """Mean toy reward of n sampled completions (T=1) on a fixed set of prompts."""
    rng = random.Random(f"measure-{seed}")
    problems = [data.make_problem(rng.choice(data.LEVELS), rng) for _ in range(n)]
    was = model.training
    model.eval()
    out, _, _ = nanor1.generate(model, [nanor1.prompt_tokens(p) for p in problems], MAX_NEW,
                                generator=torch.Generator().manual_seed(seed))
    model.train(was)
    return sum(sevens(nanor1.completion_text(c), p) for c, p in zip(out, problems)) / n


def run_grpo(tmp_path, **overrides):
    model = tiny_model()
    ref = copy.deepcopy(model)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    kw = dict(out_dir=str(tmp_path), device="cpu", seed=0, grpo_steps=30, prompts_per_step=4, group_size=8,
              max_new_tokens=MAX_NEW, grpo_lr=1e-2, beta=0.02, grpo_eval_every=0, grpo_eval_n=2, eval_batch=64,
              model=model.cfg)
    kw.update(overrides)
    cfg = nanor1.Config(**kw)
    before = mean_toy_reward(model)
    history = []
    nanor1.grpo(cfg, model, ref, torch.device("cpu"), 0, 1, data.test_set(4), history, reward_fn=sevens)
    after = mean_toy_reward(model)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"the reference model changed: {k}"
    return cfg, before, after, history


def test_grpo_raises_the_toy_reward(tmp_path):
    cfg, before, after, history = run_grpo(tmp_path)
    assert before < 0.05, before            # a random model rarely writes '7'
    assert after > 0.3 and after > before + 0.25, (before, after)
    # the training log agrees: the last steps earn more than the first
    rewards = [h["reward"] for h in history]
    assert len(rewards) == cfg.grpo_steps
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    assert history[-1]["kl"] > 0, "the policy moved away from the reference"
    # one metrics record per step, with the held-out eval at the end
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, cfg.grpo_steps + 1))
    assert all(r["stage"] == "grpo" for r in recs)
    assert "heldout" in recs[-1] and "heldout" not in recs[0]


@pytest.mark.parametrize("variant", [
    dict(agg="token", clip_high=0.28, drop_zero_std=True, mu=2),        # DAPO-style, with inner updates
    dict(agg="constant", scale_by_std=False, beta=0.0, grpo_lr=2e-2),   # Dr. GRPO
], ids=["dapo", "dr_grpo"])
def test_grpo_variants_raise_the_toy_reward(tmp_path, variant):
    _, before, after, _ = run_grpo(tmp_path, **variant)
    assert after > 0.3 and after > before + 0.25, (before, after)


class NeverEnds(moe.Transformer):
    """A Transformer that never writes end-of-text, so every rollout is truncated."""

    def forward(self, *args, **kwargs):
        logits, aux = super().forward(*args, **kwargs)
        return logits.index_fill(-1, torch.tensor([nanor1.EOT]), -1e4), aux


def test_grpo_logs_the_full_length_of_truncated_completions(tmp_path):
    torch.manual_seed(0)
    model = NeverEnds(tiny_model().cfg)
    ref = copy.deepcopy(model)
    cfg = nanor1.Config(out_dir=str(tmp_path), device="cpu", grpo_steps=1, prompts_per_step=2, group_size=4,
                        max_new_tokens=MAX_NEW, grpo_eval_every=0, grpo_eval_n=1, model=model.cfg)
    history = []
    nanor1.grpo(cfg, model, ref, torch.device("cpu"), 0, 1, data.test_set(1), history, reward_fn=sevens)
    assert history[0]["truncated"] == 1.0
    assert history[0]["length"] == MAX_NEW
