"""Rollouts: generate() with the absorbed MLA cache and left-padded batches gives exactly what a slow,
cache-free, one-prompt-at-a-time loop gives; its mask and truncated flags follow the first
end-of-text; seeded sampling is reproducible."""
import random

import pytest
import torch
from torch import nn

import data
import moe
import nanor1
from nanor1 import EOT, enc, generate

pytestmark = [pytest.mark.rmsnorm_rope, pytest.mark.gate, pytest.mark.mla_absorb]


def tiny_model(seed=0, std=0.3):
    """A tiny random model with large weights, so attention is sharp and greedy choices are decisive
    (no near-ties between logits that rounding could flip)."""
    cfg = moe.ModelConfig(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_heads=2, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                          n_activated_experts=2, vocab_size=enc.n_vocab)
    torch.manual_seed(seed)
    model = moe.Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
        for g in model.gates():          # nonzero router biases, so the biased choice matters
            g.bias.copy_(torch.linspace(-0.1, 0.1, cfg.n_routed_experts))
    return model.eval()


class EOTBias(nn.Module):
    """The model with a constant added to the end-of-text logit, so completions end at varied points."""

    def __init__(self, model, bias):
        super().__init__()
        self.inner, self.bias = model, bias
        self.cfg, self.embed = model.cfg, model.embed

    def forward(self, *args, **kwargs):
        logits, aux = self.inner(*args, **kwargs)
        logits = logits.clone()
        logits[..., EOT] += self.bias
        return logits, aux


def prompts(n_per_level=2, seed=0):
    rng = random.Random(seed)
    return [nanor1.prompt_tokens(data.make_problem(lvl, rng)) for lvl in data.LEVELS for _ in range(n_per_level)]


@torch.no_grad()
def reference_greedy(model, prompt, max_new_tokens):
    """The slow way: one prompt, no padding, no cache, the full forward recomputed every step."""
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq]))
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        seq.append(nxt)
        if nxt == EOT:
            break
    return new


@pytest.mark.parametrize("eot_bias", [0.0, 2.0, 4.0])
def test_greedy_generate_equals_slow_reference(eot_bias):
    model = EOTBias(tiny_model(), eot_bias).eval()
    ps = prompts()
    assert len({len(p) for p in ps}) > 1, "prompts of different lengths exercise the left padding"
    max_new = 14
    out, mask, truncated = generate(model, ps, max_new, greedy=True)
    refs = [reference_greedy(model, p, max_new) for p in ps]
    for i, ref in enumerate(refs):
        row = out[i].tolist()
        assert row[:len(ref)] == ref, f"prompt {i}: cached batched greedy differs from the reference"
        assert all(t == EOT for t in row[len(ref):]), "finished rows are padded with end-of-text"
        assert truncated[i].item() == (EOT not in ref)
    if eot_bias == 2.0:   # the interesting mix: some rows stop early, some run to the limit
        assert any(EOT in r for r in refs) and not all(EOT in r for r in refs)


def test_greedy_generate_cache_agrees_with_naive_cache_too():
    """The absorbed cache (generate) and a naive expanded-key cache give the same greedy tokens."""
    model = tiny_model(seed=1)
    ps = prompts(seed=1)
    out, _, _ = generate(model, ps, 10, greedy=True)
    for i, p in enumerate(ps):
        cache = moe.KVCache(model.cfg, 1, len(p) + 10, attn_impl="naive")
        with torch.no_grad():
            logits, _ = model(torch.tensor([p]), cache=cache)
            new = []
            for t in range(out.size(1)):
                nxt = int(logits[0, -1].argmax())
                new.append(nxt)
                if nxt == EOT:
                    break
                logits, _ = model(torch.tensor([[nxt]]), start_pos=len(p) + t, cache=cache)
        assert out[i].tolist()[:len(new)] == new


def first_eot(row):
    return row.index(EOT) if EOT in row else None


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_and_truncated_follow_the_first_end_of_text(seed):
    model = EOTBias(tiny_model(seed=seed), 3.0).eval()
    ps = prompts(n_per_level=12, seed=seed)
    max_new = 10
    gen = torch.Generator().manual_seed(seed)
    out, mask, truncated = generate(model, ps, max_new, temperature=1.5, generator=gen)
    B, L = out.shape
    assert B == len(ps) and mask.shape == (B, L) and truncated.shape == (B,)
    assert truncated.dtype == torch.bool
    n_trunc = n_done = 0
    for i in range(B):
        row, m = out[i].tolist(), mask[i].tolist()
        k = first_eot(row)
        if k is None:
            assert truncated[i].item() is True
            assert L == max_new
            assert all(m), "a truncated completion is all real tokens"
            n_trunc += 1
        else:
            assert truncated[i].item() is False
            assert [bool(v) for v in m] == [j <= k for j in range(L)], \
                "mask is 1 up to and including the first end-of-text, 0 after"
            assert all(t == EOT for t in row[k:]), "after end-of-text the row is padding"
            n_done += 1
    assert n_trunc > 0 and n_done > 0, "the batch should mix finished and truncated rows"
    # decoding stops as soon as every row is finished, and not before
    ends = [first_eot(out[i].tolist()) for i in range(B)]
    assert L == (max_new if None in ends else max(ends) + 1)


def test_generation_stops_early_when_every_row_ends():
    model = EOTBias(tiny_model(), 100.0).eval()   # end-of-text at once, everywhere
    out, mask, truncated = generate(model, prompts(), 20, greedy=True)
    assert out.shape == (len(prompts()), 1)
    assert (out == EOT).all() and mask.all() and not truncated.any()


def test_no_end_of_text_means_truncated_everywhere():
    model = EOTBias(tiny_model(), -1e4).eval()     # end-of-text never chosen
    out, mask, truncated = generate(model, prompts(), 7, temperature=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert out.shape == (len(prompts()), 7)
    assert (out != EOT).all() and mask.all() and truncated.all()


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    ps = prompts(n_per_level=4)
    run = lambda seed: generate(model, ps, 12, temperature=2.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(123), run(123), run(124)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].shape != c[0].shape or not torch.equal(a[0], c[0]), "another seed, other samples"


def test_top_k_1_sampling_is_greedy():
    model = tiny_model(seed=2)
    ps = prompts(seed=2)
    greedy, _, _ = generate(model, ps, 10, greedy=True)
    sampled, _, _ = generate(model, ps, 10, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


def test_top_k_samples_only_among_the_k_best():
    """With top_k=3, every sampled first token is one of the reference's three highest logits."""
    model = tiny_model(seed=3)
    ps = prompts(n_per_level=3, seed=3)
    out, _, _ = generate(model, ps, 1, temperature=10.0, top_k=3, generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(ps):
        with torch.no_grad():
            logits, _ = model(torch.tensor([p]))
        assert out[i, 0].item() in logits[0, -1].topk(3).indices.tolist()


def test_generate_builds_no_autograd_graph():
    """Rollouts run without autograd even when the caller has it on (GRPO calls generate between
    updates): every forward inside generate sees grad mode off."""
    model = tiny_model()
    modes = []
    model.register_forward_hook(lambda module, args, out: modes.append(torch.is_grad_enabled()))
    assert torch.is_grad_enabled()
    generate(model, prompts(), 4, generator=torch.Generator().manual_seed(0))
    assert modes and not any(modes)


def test_generate_leaves_the_model_mode_and_router_loads_alone():
    model = tiny_model()
    generate(model, prompts(), 5, greedy=True)
    assert not model.training
    assert all((g.load == 0).all() for g in model.gates()), "inference must not count router loads"


@pytest.mark.rewards
def test_evaluate_counts_response_length_without_end_of_text():
    """mean_length counts response tokens, end-of-text not counted: 0 for an immediate end-of-text."""
    model = EOTBias(tiny_model(), 100.0).eval()
    cfg = nanor1.Config(max_new_tokens=5, eval_batch=64, device="cpu")
    res = nanor1.evaluate(model, data.test_set(2), cfg, torch.device("cpu"))
    assert res["overall"]["mean_length"] == 0.0
    assert res["overall"]["accuracy"] == 0.0 and res["overall"]["format"] == 0.0


@pytest.mark.rewards
def test_evaluate_counts_every_token_of_a_truncated_completion():
    model = EOTBias(tiny_model(), -1e4).eval()      # never ends: every completion is truncated
    cfg = nanor1.Config(max_new_tokens=5, eval_batch=64, device="cpu")
    res = nanor1.evaluate(model, data.test_set(2), cfg, torch.device("cpu"))
    assert res["overall"]["mean_length"] == 5.0
