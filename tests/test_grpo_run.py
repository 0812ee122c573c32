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
    # one metrics record per step; no held-out look (grpo_eval_every=0; the caller evaluates the
    # result), and the last step keeps a group of its samples for samples.html
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, cfg.grpo_steps + 1))
    assert all(r["stage"] == "grpo" for r in recs)
    assert not any("heldout" in r for r in recs)
    assert "samples" in recs[-1] and "samples" not in recs[0]


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


# -----------------------------------------------------------------------------
# Inside one GRPO step: what grpo_loss is given, what is logged

class EndsSometimes(moe.Transformer):
    """A Transformer with a bonus on end-of-text, so completions end at varied lengths."""

    def forward(self, *args, **kwargs):
        logits, aux = super().forward(*args, **kwargs)
        bonus = torch.zeros(logits.size(-1), dtype=logits.dtype, device=logits.device)
        bonus[nanor1.EOT] = 4.0
        return logits + bonus, aux


@torch.no_grad()
def prefix_by_prefix(model, prompts, comps):
    """log pi(comps[i, t] | prompt i, comps[i, :t]) and the entropy of that prediction, (B, L) in
    fp64: the model run on each unpadded prefix alone, its last position."""
    was = model.training
    model.eval()
    logp, ent = torch.zeros(comps.shape, dtype=torch.float64), torch.zeros(comps.shape, dtype=torch.float64)
    for i, p in enumerate(prompts):
        for t in range(comps.size(1)):
            lp = model(torch.tensor([p + comps[i, :t].tolist()]))[0][0, -1].double().log_softmax(-1)
            logp[i, t], ent[i, t] = lp[comps[i, t]], -(lp.exp() * lp).sum()
    model.train(was)
    return logp, ent


def one_grpo_step(tmp_path, monkeypatch, mu):
    """One GRPO step of a tiny EndsSometimes model with large weights, spying on nanor1.generate (the rollout) and on
    nanor1.grpo_loss (each inner update) -> (the model before the step, rollout (prompts, comps,
    mask), the grpo_loss calls, history)."""
    torch.manual_seed(0)
    model = EndsSometimes(tiny_model().cfg)
    with torch.no_grad():          # large weights: entropies that differ from token to token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    before = copy.deepcopy(model)
    rollouts, calls = [], []
    real_generate, real_loss = nanor1.generate, nanor1.grpo_loss

    def generate(model, prompts, *args, **kwargs):
        out = real_generate(model, prompts, *args, **kwargs)
        rollouts.append((prompts, out[0].clone(), out[1].clone()))
        return out

    def grpo_loss(logp, old_logp, *args, **kwargs):
        calls.append({"logp": logp.detach().clone(), "old": old_logp.detach().clone(),
                      "old_requires_grad": old_logp.requires_grad})
        return real_loss(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(nanor1, "generate", generate)
    monkeypatch.setattr(nanor1, "grpo_loss", grpo_loss)
    cfg = nanor1.Config(out_dir=str(tmp_path), device="cpu", seed=0, grpo_steps=1, prompts_per_step=2, group_size=4,
                        max_new_tokens=MAX_NEW, grpo_lr=1e-2, beta=0.02, mu=mu, grpo_eval_every=0, grpo_eval_n=1,
                        eval_batch=64, model=model.cfg)
    history = []
    nanor1.grpo(cfg, model, copy.deepcopy(model), torch.device("cpu"), 0, 1, data.test_set(1), history,
                reward_fn=lambda text, p: len(text) / MAX_NEW)
    return before, rollouts[0], calls, history


def test_grpo_inner_updates_keep_pi_old_from_before_the_first_update(tmp_path, monkeypatch):
    """mu = 3 updates on one rollout batch: grpo_loss gets the same old_logp every time, the
    log-probs of the policy before the first update (computed here, prefix by prefix), and from
    the second update on logp has moved away from it (ratio != 1, so clipping can act). Guards
    against pi_old re-read from the current policy at every inner update (ratio always 1)."""
    before, (prompts, comps, mask), calls, _ = one_grpo_step(tmp_path, monkeypatch, mu=3)
    assert len(calls) == 3
    expected, _ = prefix_by_prefix(before, prompts, comps)
    for k, c in enumerate(calls):
        assert not c["old_requires_grad"], "pi_old is a constant"
        assert torch.equal(c["old"], calls[0]["old"]), f"update {k + 1}: pi_old changed between inner updates"
    m = mask.bool()
    torch.testing.assert_close(calls[0]["old"].double()[m], expected[m], rtol=0, atol=1e-4,
                               msg=lambda s: f"old_logp is not the policy before the first update: {s}")
    torch.testing.assert_close(calls[0]["logp"][m], calls[0]["old"][m], rtol=0, atol=1e-5)   # ratio 1 at first
    for k, c in enumerate(calls[1:], 2):
        moved = (c["logp"] - c["old"])[m].abs().max().item()
        assert moved > 1e-3, f"update {k}: ratio is 1 everywhere (max |logp - old_logp| = {moved:.2e})"


def test_grpo_single_update_is_on_policy_with_pi_old_the_detached_logp(tmp_path, monkeypatch):
    """mu = 1: old_logp is logp itself, detached (ratio 1 with the gradient of ratio * A), and
    both are the log-probs of the policy that sampled. Guards against a non-detached old_logp
    (ratio exp(logp - logp) has no gradient: no learning) and a stale or wrong pi_old."""
    before, (prompts, comps, mask), calls, _ = one_grpo_step(tmp_path, monkeypatch, mu=1)
    assert len(calls) == 1
    c = calls[0]
    assert not c["old_requires_grad"], "old_logp must be detached"
    assert torch.equal(c["old"], c["logp"])
    expected, _ = prefix_by_prefix(before, prompts, comps)
    m = mask.bool()
    torch.testing.assert_close(c["old"].double()[m], expected[m], rtol=0, atol=1e-4)


def test_grpo_logged_entropy_is_the_mean_over_completion_tokens_only(tmp_path, monkeypatch):
    """The "entropy" of the step's record is the mean over completion tokens (up to and including
    the first end-of-text) of the per-token entropy, computed here prefix by prefix, on a step
    whose completions have different lengths. Guards against an entropy averaged over the
    end-of-text padding too."""
    before, (prompts, comps, mask), _, history = one_grpo_step(tmp_path, monkeypatch, mu=1)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and not mask.all(), "completions of different lengths, some padded"
    _, ent = prefix_by_prefix(before, prompts, comps)
    m = mask.bool()
    expected = ent[m].mean().item()
    assert abs(expected - ent.mean().item()) > 1e-2, "padding would change the mean: the test can tell"
    assert history[0]["entropy"] == pytest.approx(expected, abs=1e-4)


def test_grpo_steps_the_head_at_grpo_head_lr_mult_times_grpo_lr(tmp_path):
    """grpo() gives the output head grpo_head_lr_mult x grpo_lr, the rest grpo_lr: checked by
    AdamW's first step, which moves each weight with a gradient well above eps by the lr itself
    (GRPO has no weight decay), whatever the gradient's size or clipping."""
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = nanor1.Config(out_dir=str(tmp_path), device="cpu", seed=0, grpo_steps=1, prompts_per_step=2,
                        group_size=4, max_new_tokens=MAX_NEW, grpo_lr=1e-3, grpo_head_lr_mult=3.0,
                        grpo_eval_every=0, grpo_eval_n=1, model=model.cfg)
    nanor1.grpo(cfg, model, copy.deepcopy(model), torch.device("cpu"), 0, 1, data.test_set(1), [],
                reward_fn=lambda text, problem: float(len(text) % 3))   # unequal rewards in a group
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    head = moved["head.weight"]
    assert head.median().item() == pytest.approx(3e-3, rel=0.01)
    norm = moved["norm.weight"]
    assert norm.median().item() == pytest.approx(1e-3, rel=0.01)
