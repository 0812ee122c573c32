"""The GRPO math (DeepSeekMath eq. 3, R1-Zero, Dr. GRPO, DAPO), each piece against numbers worked
by hand or by plain Python loops."""
import contextlib
import math
import random

import pytest
import torch

import data
import moe
import nanor1
from nanor1 import EOT, group_advantages, grpo_loss, kl_k3, masked_mean

LN2 = math.log(2.0)

# -----------------------------------------------------------------------------
# group_advantages


@pytest.mark.advantages
def test_group_advantages_hand_example():
    # group 1: [1, 2, 3, 6], mean 3, deviations -2 -1 0 3, unbiased var 14/3
    # group 2: [0, 1], mean 0.5, deviations -0.5 0.5, unbiased var 0.5
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.5, 0.5])
    eps = 1e-4
    s1, s2 = math.sqrt(14 / 3), math.sqrt(0.5)
    expected = [-2 / (s1 + eps), -1 / (s1 + eps), 0.0, 3 / (s1 + eps)]
    got = group_advantages(r[:4], 4)
    assert got.shape == (4,)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    # groups of 2: [1,2] [3,6] [0,1] [0.5,0.5]
    got = group_advantages(r, 2)
    sd = [math.sqrt(0.5), math.sqrt(4.5), s2, 0.0]
    dev = [-0.5, 0.5, -1.5, 1.5, -0.5, 0.5, 0.0, 0.0]
    expected = [d / (sd[i // 2] + eps) for i, d in enumerate(dev)]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


@pytest.mark.advantages
def test_group_advantages_binary_rewards_numbers():
    # one right out of four: mean 0.25, unbiased std sqrt(0.75 * 0.25 * 4 / 3) = 0.5
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
    assert torch.allclose(got, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-6)


@pytest.mark.advantages
def test_group_advantages_uses_eps():
    r = torch.tensor([0.0, 2.0])     # deviations -1, 1; unbiased std sqrt(2)
    got = group_advantages(r, 2, eps=0.5)
    assert torch.allclose(got, torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 0.5), atol=1e-6)


@pytest.mark.advantages
def test_group_advantages_without_std_scaling_are_plain_deviations():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 10.0, 14.0])
    got = group_advantages(r, 4, scale_by_std=False)
    assert torch.allclose(got, torch.tensor([-2.0, -1.0, 0.0, 3.0, -1.0, -1.0, -1.0, 3.0]), atol=1e-6)


@pytest.mark.advantages
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_equal_rewards_give_zeros(scale_by_std):
    r = torch.tensor([0.7] * 4 + [0.0] * 4 + [1.2] * 4)
    got = group_advantages(r, 4, scale_by_std=scale_by_std)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.zeros(12), atol=1e-4)


@pytest.mark.advantages
def test_group_advantages_groups_are_contiguous_random_vs_loop():
    g = torch.Generator().manual_seed(0)
    G, n = 8, 5
    r = torch.rand(n * G, generator=g, dtype=torch.float64)
    got = group_advantages(r, G)
    vals = r.tolist()
    for k in range(n):
        grp = vals[k * G:(k + 1) * G]
        mean = sum(grp) / G
        std = math.sqrt(sum((v - mean) ** 2 for v in grp) / (G - 1))
        for i in range(G):
            assert abs(got[k * G + i].item() - (grp[i] - mean) / (std + 1e-4)) < 1e-9
        assert abs(sum(got[k * G:(k + 1) * G].tolist())) < 1e-9   # zero mean per group


# -----------------------------------------------------------------------------
# masked_mean


def random_case(B=4, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[:, 0] = True   # every row has a token
    return x, mask


@pytest.mark.grpo_loss
@pytest.mark.parametrize("as_float", [False, True])
def test_masked_mean_all_vs_loop(as_float):
    x, mask = random_case()
    s = n = 0.0
    for i in range(x.size(0)):
        for j in range(x.size(1)):
            if mask[i, j]:
                s += x[i, j].item()
                n += 1
    got = masked_mean(x, mask.double() if as_float else mask)
    assert got.dim() == 0
    assert abs(got.item() - s / n) < 1e-12


@pytest.mark.grpo_loss
def test_masked_mean_dim1_vs_loop():
    x, mask = random_case()
    got = masked_mean(x, mask, dim=1)
    assert got.shape == (x.size(0),)
    for i in range(x.size(0)):
        vals = [x[i, j].item() for j in range(x.size(1)) if mask[i, j]]
        assert abs(got[i].item() - sum(vals) / len(vals)) < 1e-12


@pytest.mark.grpo_loss
def test_masked_mean_ignores_masked_values_entirely():
    x = torch.tensor([[1.0, 3.0, 1e6], [2.0, -1e6, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 3.0])


@pytest.mark.grpo_loss
def test_masked_mean_gradient_only_on_masked_entries():
    x = torch.tensor([[1.0, 3.0, 5.0], [2.0, 6.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    masked_mean(x, mask).backward()
    assert torch.allclose(x.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


# -----------------------------------------------------------------------------
# kl_k3


@pytest.mark.grpo_loss
def test_kl_k3_formula_on_hand_values():
    logp = torch.tensor([-1.0, -1.0, -1.0, -2.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.0 + LN2, -1.0 - LN2, -0.5, -3.0], dtype=torch.float64)
    expected = []
    for lp, rf in zip(logp.tolist(), ref.tolist()):
        d = rf - lp
        expected.append(math.exp(d) - d - 1)
    got = kl_k3(logp, ref)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # d = ln 2: 2 - ln 2 - 1; d = -ln 2: 1/2 + ln 2 - 1
    assert got[1].item() == pytest.approx(1 - LN2)
    assert got[2].item() == pytest.approx(LN2 - 0.5)


@pytest.mark.grpo_loss
def test_kl_k3_is_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    logp = -5 * torch.rand(1000, generator=g)
    ref = -5 * torch.rand(1000, generator=g)
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros(1000))


@pytest.mark.grpo_loss
def test_kl_k3_is_an_unbiased_estimate_of_kl_policy_to_ref():
    """Averaged over samples from pi_theta, k3 estimates KL(pi_theta || pi_ref) = sum p log(p/q)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    g = torch.Generator().manual_seed(2)
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    est = kl_k3(p.log()[x], q.log()[x]).mean().item()
    assert est == pytest.approx(kl, rel=0.02)


# -----------------------------------------------------------------------------
# grpo_loss: one hand-worked batch
#
#   row 0: A = +1, ratios [1.0, 1.5, 0.5], mask [1 1 1]
#     token 0: min(1.0, 1.0)       = 1.0  -> -1.0
#     token 1: min(1.5, 1.2)       = 1.2  -> -1.2   clipped (A > 0, ratio > 1 + 0.2)
#     token 2: min(0.5, 0.8)       = 0.5  -> -0.5
#   row 1: A = -2, ratios [0.5, 1.5, 1.0], mask [1 1 0]
#     token 0: min(-1.0, -1.6)     = -1.6 -> +1.6   clipped (A < 0, ratio < 1 - 0.2)
#     token 1: min(-3.0, -2.4)     = -3.0 -> +3.0
#     token 2: masked out
#   seq:      mean(-2.7 / 3, 4.6 / 2) = mean(-0.9, 2.3) = 0.7
#   token:    (-2.7 + 4.6) / 5 = 0.38
#   constant: 1.9 / (2 * max_len)
#   clip_frac = 2 / 5
#   with ref - logp = [[0, ln2, -ln2], [ln2, 0, 0]]:
#     k3 = [[0, 1 - ln2, ln2 - 0.5], [1 - ln2, 0, (masked)]], kl stat = (1.5 - ln2) / 5

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
RATIO = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 1.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
D_REF = torch.tensor([[0.0, LN2, -LN2], [LN2, 0.0, 0.0]], dtype=torch.float64)


def hand_inputs():
    logp = (OLD + RATIO.log()).clone().requires_grad_(True)
    ref = (logp + D_REF).detach()
    return logp, OLD.clone(), ref


@pytest.mark.grpo_loss
@pytest.mark.parametrize("agg,max_len,expected", [
    ("seq", None, 0.7),
    ("token", None, 0.38),
    ("constant", 4, 1.9 / 8),
    ("constant", None, 1.9 / 6),
])
def test_grpo_loss_hand_example_each_aggregation(agg, max_len, expected):
    logp, old, ref = hand_inputs()
    loss, stats = grpo_loss(logp, old, ref, ADV, MASK, clip_low=0.2, clip_high=0.2, beta=0.0, agg=agg,
                            max_len=max_len)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["kl"] == pytest.approx((1.5 - LN2) / 5)
    assert isinstance(stats["clip_frac"], float) and isinstance(stats["kl"], float)


@pytest.mark.grpo_loss
@pytest.mark.parametrize("agg,expected_kl_term", [
    ("seq", (0.5 / 3 + (1 - LN2) / 2) / 2),       # row sums 0.5 and 1 - ln2
    ("token", (1.5 - LN2) / 5),
    ("constant", (1.5 - LN2) / 8),
])
def test_grpo_loss_beta_kl_term(agg, expected_kl_term):
    logp, old, ref = hand_inputs()
    base = {"seq": 0.7, "token": 0.38, "constant": 1.9 / 8}[agg]
    beta = 0.1
    loss, stats = grpo_loss(logp, old, ref, ADV, MASK, 0.2, 0.2, beta=beta, agg=agg, max_len=4)
    assert loss.item() == pytest.approx(base + beta * expected_kl_term, abs=1e-9)
    assert stats["kl"] == pytest.approx((1.5 - LN2) / 5)


@pytest.mark.grpo_loss
def test_grpo_loss_gradients_hand_example():
    """d loss / d logp: clipped tokens and masked tokens get exactly zero; the others get
    -ratio * A / (n_tokens_of_row * B) under seq aggregation (d ratio / d logp = ratio)."""
    logp, old, ref = hand_inputs()
    loss, _ = grpo_loss(logp, old, ref, ADV, MASK, 0.2, 0.2, beta=0.0, agg="seq")
    loss.backward()
    expected = torch.tensor([[-1.0 * 1 / 3 / 2, 0.0, -0.5 * 1 / 3 / 2],
                             [0.0, -1.5 * -2 / 2 / 2, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-12)


@pytest.mark.grpo_loss
def test_grpo_loss_kl_gradient_pulls_towards_reference():
    """beta * k3 alone (A = 0): d/dlogp = beta * (1 - exp(ref - logp)) / n; it lowers logp where
    the policy is above the reference and raises it where below."""
    logp, old, ref = hand_inputs()
    loss, _ = grpo_loss(logp, old, ref, torch.zeros(2, dtype=torch.float64), MASK, beta=0.5, agg="token")
    loss.backward()
    expected = 0.5 * (1 - D_REF.exp()) / 5 * MASK
    assert torch.allclose(logp.grad, expected, atol=1e-12)


def one_token(ratio, adv, clip_low=0.2, clip_high=0.2):
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = grpo_loss(logp, old, None, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1),
                            clip_low, clip_high, beta=0.0, agg="seq")
    loss.backward()
    return loss.item(), logp.grad.item(), stats["clip_frac"]


@pytest.mark.grpo_loss
@pytest.mark.parametrize("ratio,adv,clip_low,clip_high,value,clipped", [
    # positive advantage: capped at 1 + clip_high, never floored
    (1.5, 2.0, 0.2, 0.2, -1.2 * 2.0, True),
    (1.25, 2.0, 0.2, 0.28, -1.25 * 2.0, False),     # DAPO clip-higher lets 1.25 through
    (1.3, 2.0, 0.2, 0.28, -1.28 * 2.0, True),
    (0.5, 2.0, 0.2, 0.2, -0.5 * 2.0, False),        # below 1 - clip_low with A > 0: not clipped
    # negative advantage: floored at 1 - clip_low, never capped
    (0.5, -2.0, 0.2, 0.2, 0.8 * 2.0, True),
    (0.75, -2.0, 0.3, 0.2, 0.75 * 2.0, False),
    (0.6, -2.0, 0.3, 0.2, 0.7 * 2.0, True),
    (1.5, -2.0, 0.2, 0.2, 1.5 * 2.0, False),        # above 1 + clip_high with A < 0: not clipped
    (1.0, 3.0, 0.2, 0.2, -3.0, False),
])
def test_grpo_loss_clipping_one_token(ratio, adv, clip_low, clip_high, value, clipped):
    loss, grad, clip_frac = one_token(ratio, adv, clip_low, clip_high)
    assert loss == pytest.approx(value, abs=1e-9)
    assert clip_frac == (1.0 if clipped else 0.0)
    if clipped:
        assert grad == 0.0                           # a clipped token pushes no further
    else:
        assert grad == pytest.approx(-ratio * adv, abs=1e-9)


@pytest.mark.grpo_loss
@pytest.mark.parametrize("adv", [1.0, 0.3, -0.3, -1.0])
@pytest.mark.parametrize("agg", ["seq", "token", "constant"])
def test_grpo_loss_gradient_direction(adv, agg):
    """At ratio 1 (on-policy), raising the log-prob of a positive-advantage token lowers the loss,
    and of a negative-advantage token raises it."""
    g = torch.Generator().manual_seed(3)
    logp = (-3 * torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    A = torch.tensor([adv, adv, adv], dtype=torch.float64)
    loss, _ = grpo_loss(logp, logp.detach(), None, A, torch.ones(3, 5), beta=0.0, agg=agg, max_len=5)
    loss.backward()
    assert (torch.sign(logp.grad) == -math.copysign(1.0, adv)).all()
    # and the loss actually moves that way after a small step
    with torch.no_grad():
        stepped = logp + 1e-3
    loss2, _ = grpo_loss(stepped, logp.detach(), None, A, torch.ones(3, 5), beta=0.0, agg=agg, max_len=5)
    assert (loss2.item() < loss.item()) == (adv > 0)


@pytest.mark.grpo_loss
def test_grpo_loss_zero_advantage_and_on_policy_is_zero():
    logp = torch.randn(2, 4, dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp, logp, torch.zeros(2, dtype=torch.float64), torch.ones(2, 4), beta=0.3)
    assert loss.item() == 0.0
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0


@pytest.mark.grpo_loss
@pytest.mark.parametrize("agg", ["seq", "token", "constant"])
def test_grpo_loss_random_batch_vs_python_loops(agg):
    """Random ratios, advantages, masks, beta > 0: every aggregation against explicit loops."""
    rnd = random.Random(4)
    B, L, max_len, beta, lo, hi = 5, 6, 8, 0.04, 0.2, 0.28
    old = [[-rnd.uniform(0.1, 4) for _ in range(L)] for _ in range(B)]
    logp = [[o + rnd.uniform(-0.5, 0.5) for o in row] for row in old]
    ref = [[lp + rnd.uniform(-1, 1) for lp in row] for row in logp]
    adv = [rnd.uniform(-2, 2) for _ in range(B)]
    mask = [[1] * rnd.randint(1, L) for _ in range(B)]
    mask = [m + [0] * (L - len(m)) for m in mask]
    per_tok, clipped, kls = [], 0, []
    for i in range(B):
        row = []
        for j in range(L):
            ratio = math.exp(logp[i][j] - old[i][j])
            surr = min(ratio * adv[i], min(max(ratio, 1 - lo), 1 + hi) * adv[i])
            d = ref[i][j] - logp[i][j]
            kl = math.exp(d) - d - 1
            row.append(-surr + beta * kl)
            if mask[i][j]:
                clipped += (ratio > 1 + hi and adv[i] > 0) or (ratio < 1 - lo and adv[i] < 0)
                kls.append(kl)
        per_tok.append(row)
    n_tok = sum(map(sum, mask))
    if agg == "seq":
        expected = sum(sum(p * m for p, m in zip(pr, mr)) / sum(mr) for pr, mr in zip(per_tok, mask)) / B
    elif agg == "token":
        expected = sum(p * m for pr, mr in zip(per_tok, mask) for p, m in zip(pr, mr)) / n_tok
    else:
        expected = sum(p * m for pr, mr in zip(per_tok, mask) for p, m in zip(pr, mr)) / (B * max_len)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    loss, stats = grpo_loss(t(logp), t(old), t(ref), t(adv), torch.tensor(mask), lo, hi, beta, agg, max_len)
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert stats["clip_frac"] == pytest.approx(clipped / n_tok)
    assert stats["kl"] == pytest.approx(sum(kls) / n_tok)
    assert clipped > 0   # the case exercises clipping


# -----------------------------------------------------------------------------
# sequence_logprobs: the log-probs the GRPO ratio and KL are made of


def sharp_tiny_model(seed=0):
    """A tiny random model with large weights: its predictions differ a lot from position to
    position, so a log-prob taken at the wrong position shows."""
    cfg = moe.ModelConfig(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_heads=2, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                          n_activated_experts=2, vocab_size=nanor1.enc.n_vocab)
    torch.manual_seed(seed)
    model = moe.Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
def test_sequence_logprobs_are_the_predictions_of_the_completion_tokens():
    """With left-padded prompts and the key mask as grpo builds them, logp[i, t] is log pi of
    completion token t given the prompt and the completion before it, and entropy[i, t] the entropy
    of that prediction, up to the completion's first end-of-text (its mask); both 0 after it: the
    model run one prefix at a time, unpadded, taking the last position. Guards against each
    completion token scored at the wrong position (as the input at its own position, e.g.
    logits[:, P:] instead of logits[:, P-1:]), and against the packing of the sequences into rows
    (plumbing.pack_sequences) letting one sequence see another or misplacing one."""
    model = sharp_tiny_model()
    rng = random.Random(0)
    prompts = [nanor1.prompt_tokens(data.make_problem(lvl, rng)) for lvl in data.LEVELS for _ in range(2)]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths: left padding is exercised"
    L = 6
    comps = torch.randint(0, 256, (len(prompts), L), generator=torch.Generator().manual_seed(1))
    for i, end in enumerate([1, 3, 5, None, 0, 2, None, 4]):   # an end-of-text, then end-of-text padding
        if end is not None:
            comps[i, end:] = EOT
    prompt_tok, prompt_mask = nanor1.pad_left(prompts, EOT, "cpu")
    P = prompt_tok.size(1)
    tokens = torch.cat([prompt_tok, comps], 1)
    key_mask = torch.cat([prompt_mask, torch.ones_like(comps, dtype=torch.bool)], 1)
    is_eot = (comps == EOT).int()
    comp_mask = (is_eot.cumsum(1) - is_eot) == 0           # as generate: up to the first EOT
    with torch.no_grad():
        logp, entropy, _ = nanor1.sequence_logprobs(model, tokens, key_mask, P, comp_mask,
                                                    contextlib.nullcontext())
    assert logp.shape == entropy.shape == (len(prompts), L)
    assert not comp_mask.all() and comp_mask.any(1).all()
    assert (logp[~comp_mask] == 0).all() and (entropy[~comp_mask] == 0).all()
    for i, p in enumerate(prompts):
        for t in range(int(comp_mask[i].sum())):
            with torch.no_grad():
                last = model(torch.tensor([p + comps[i, :t].tolist()]))[0][0, -1].double()
            lp = last.log_softmax(-1)
            assert logp[i, t].item() == pytest.approx(lp[comps[i, t]].item(), abs=1e-4), (i, t)
            assert entropy[i, t].item() == pytest.approx(-(lp.exp() * lp).sum().item(), abs=1e-4), (i, t)
