"""nanor1.sample, the sampler of every rollout, against the distribution it is given; generate's
temperature and evaluate's forced tags, through stand-in models of fixed behaviour. No test here
runs model code (moe.py's Transformer), so none carries a model assignment marker; those that
score completions carry "rewards"."""

import pytest
import torch
from torch import nn

import data
import moe
import nanor1
from nanor1 import EOT, encode


def test_sample_draws_each_token_with_its_probability():
    """nanor1.sample against the distribution it is given: counts within 5 binomial standard
    deviations of n * p for every token, never a zero-probability token (first, middle or last)."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0],
                          [0.5, 0.0, 0.0, 0.0, 0.0, 0.5],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                          [1 / 6] * 6], dtype=torch.float32)
    n = 40_000
    drawn = nanor1.sample(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, len(probs))
    for row, p in enumerate(probs.double()):
        counts = torch.bincount(drawn[:, row], minlength=len(p)).double()
        assert (counts[p == 0] == 0).all(), f"row {row}: a zero-probability token was drawn"
        sd = (n * p * (1 - p)).sqrt()
        assert ((counts - n * p).abs() <= 5 * sd + 1e-9).all(), f"row {row}: {counts.tolist()} vs {(n * p).tolist()}"


def test_sample_refuses_non_finite_probabilities():
    """NaN logits (a corrupted checkpoint) must stop rollouts with a clear error, not yield tokens."""
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])
    with pytest.raises(SystemExit, match="^error: .*NaN or infinite"):
        nanor1.sample(probs, torch.Generator().manual_seed(0))


def test_sample_normalises_weights_that_do_not_sum_to_one():
    """sample() takes unnormalised weights (its docstring: u * total): counts follow
    weights / sum, for sums well above and well below one. Guards against a sampler that assumes
    probabilities summing to one."""
    weights = torch.tensor([[0.0, 2.0, 0.0, 3.0, 5.0, 0.0],          # sum 10
                            [1e-3, 0.0, 3e-3, 0.0, 0.0, 0.0],       # sum 0.004
                            [7.0, 7.0, 7.0, 7.0, 7.0, 7.0]], dtype=torch.float32)
    n = 40_000
    drawn = nanor1.sample(weights.repeat(n, 1), torch.Generator().manual_seed(1)).view(n, len(weights))
    for row, w in enumerate(weights.double()):
        p = w / w.sum()
        counts = torch.bincount(drawn[:, row], minlength=len(p)).double()
        assert (counts[p == 0] == 0).all(), f"row {row}: a zero-weight token was drawn"
        sd = (n * p * (1 - p)).sqrt()
        assert ((counts - n * p).abs() <= 5 * sd + 1e-9).all(), f"row {row}: {counts.tolist()} vs {(n * p).tolist()}"


# -----------------------------------------------------------------------------
# generate's temperature, through a model of fixed logits

def stand_in_config():
    """A ModelConfig for KVCache's shapes only (no Transformer is built)."""
    return moe.ModelConfig(dim=8, inter_dim=8, moe_inter_dim=8, n_layers=1, n_heads=1, kv_lora_rank=2,
                           qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=2,
                           n_activated_experts=1, vocab_size=nanor1.enc.n_vocab)


class FixedLogits(nn.Module):
    """Stands in for the Transformer in generate(): the same logits z at every row and position."""

    def __init__(self, z):
        super().__init__()
        self.cfg, self.embed, self.z = stand_in_config(), nn.Embedding(1, 1), z

    def forward(self, tokens, start_pos=0, cache=None, key_mask=None):
        B, T = tokens.shape
        return self.z.expand(B, T, -1).clone(), torch.zeros(())


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_generate_samples_from_softmax_of_logits_over_temperature(T):
    """One-token completions from fixed logits z: counts within 5 binomial standard deviations of
    softmax(z / T), and far (> 20 of them) from softmax(z) and from softmax(z * T). Guards
    against the temperature ignored or applied the wrong way (logits * T)."""
    z = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -0.5])
    n = 20_000
    out, _, _ = nanor1.generate(FixedLogits(z), [[EOT, 7]] * n, 1, temperature=T,
                                generator=torch.Generator().manual_seed(0))
    assert out.shape == (n, 1)
    counts = torch.bincount(out[:, 0], minlength=len(z)).double()
    assert counts.sum() == n and len(counts) == len(z)

    def deviations(p):
        p = p.double()
        return ((counts - n * p).abs() / (n * p * (1 - p)).sqrt()).max().item()
    assert deviations((z / T).softmax(-1)) <= 5, f"T={T}: {counts.tolist()} vs n * softmax(z / T)"
    assert deviations(z.softmax(-1)) > 20, "indistinguishable from T = 1: the test would not see it ignored"
    assert deviations((z * T).softmax(-1)) > 20


# -----------------------------------------------------------------------------
# evaluate's forced tags, through a model that writes a fixed continuation

class Continues(nn.Module):
    """Stands in for the Transformer in generate(), greedy: reads each prompt "problem=" + a forced
    tag and writes, after <answer>, "N</answer>"; after <think>, "problem</think><answer>N</answer>";
    after nothing, "<answer>N</answer>"; then end-of-text. N is the right answer, plus one for the
    problems in `wrong`."""

    def __init__(self, answers: dict, wrong: set):
        super().__init__()
        self.cfg, self.embed, self.answers, self.wrong = stand_in_config(), nn.Embedding(1, 1), answers, wrong

    def continuation(self, prompt: str) -> list:
        assert prompt.startswith("<|endoftext|>")
        problem, forced = prompt.removeprefix("<|endoftext|>").split("=")
        n = self.answers[problem] + (problem in self.wrong)
        text = {"<answer>": f"{n}</answer>", "<think>": f"{problem}</think><answer>{n}</answer>",
                "": f"<answer>{n}</answer>"}[forced]
        return encode(text) + [EOT]

    def forward(self, tokens, start_pos=0, cache=None, key_mask=None):
        B, T = tokens.shape
        if start_pos == 0:                                           # the prefill: read the prompts
            self.P = T
            self.scripts = [self.continuation(nanor1.enc.decode(tokens[i][key_mask[i]].tolist())) for i in range(B)]
        step = start_pos + T - self.P                                # the index of the token to write next
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        for i, script in enumerate(self.scripts):
            logits[i, -1, script[step] if step < len(script) else EOT] = 10.0
        return logits, torch.zeros(())


@pytest.mark.rewards
def test_forced_tag_evaluations_score_the_completion_with_its_forced_tag():
    """evaluate(force="answer") and (force="think") score the forced tag + what the model wrote:
    a model that writes "N</answer>" after a forced <answer> answers right where N is right
    (2 of 3 problems per level here); after a forced <think> it thinks every time, well formed.
    Guards against the forced evaluations scoring the completion without its forced tag (the
    "forced to answer" accuracy would read 0, "forced to think" would never think)."""
    tests = data.test_set(3)
    answers = {p.text: p.answer for ps in tests.values() for p in ps}
    model = Continues(answers, wrong={ps[0].text for ps in tests.values()})
    cfg = nanor1.Config(max_new_tokens=40, eval_batch=64, device="cpu")
    res = {f: nanor1.evaluate(model, tests, cfg, torch.device("cpu"), force=f) for f in ("answer", "think", "")}
    for level in [*tests, "overall"]:
        assert res["answer"][level]["accuracy"] == pytest.approx(2 / 3), (level, res["answer"][level])
        assert res["answer"][level]["think_rate"] == 0.0 and res["answer"][level]["format"] == 0.0
        assert res["think"][level]["accuracy"] == pytest.approx(2 / 3), (level, res["think"][level])
        assert res["think"][level]["think_rate"] == 1.0 and res["think"][level]["format"] == 1.0
        assert res[""][level]["accuracy"] == pytest.approx(2 / 3) and res[""][level]["think_rate"] == 0.0
