"""Tests of DeepSeekMoE routing and load balancing in moe.py: the Gate against a brute-force
per-token router, the MoE against a per-token expert loop, the sequence-wise balance loss against
its formula on a hand-built example, and the auxiliary-loss-free bias update.

Markers name the classroom assignments whose code runs.
"""
import math

import pytest
import torch

from moe import MoE, Gate, ModelConfig, Transformer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test sees the same random data, whatever ran before it


def tiny_cfg(**kw):
    base = dict(vocab_size=50, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                n_heads=2, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def brute_route(x, gate_w, bias, cfg):
    """One token x (dim,), by hand: -> {expert: weight}."""
    logits = gate_w.double() @ x.double()
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    biased = (scores + bias.double()).tolist()
    E, G = cfg.n_routed_experts, cfg.n_expert_groups
    per = E // G
    allowed = list(range(E))
    if G > 1:
        group_score = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -group_score[g])[:cfg.n_limited_groups]
        allowed = [e for e in allowed if e // per in kept]
    chosen = sorted(allowed, key=lambda e: -biased[e])[:cfg.n_activated_experts]
    ws = [float(scores[e]) for e in chosen]
    if cfg.score_func == "sigmoid":
        ws = [w / sum(ws) for w in ws]
    return {e: w * cfg.route_scale for e, w in zip(chosen, ws)}


def dense(weights, indices, E):
    """(N, k) weights/indices -> (N, E) with zeros for experts not chosen."""
    out = torch.zeros(weights.size(0), E, dtype=torch.float64)
    return out.scatter_(1, indices, weights.double())


def random_gate(cfg, seed=0, bias_std=0.1):
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) / math.sqrt(cfg.dim) * 2)
        gate.bias.copy_(bias_std * torch.randn(cfg.n_routed_experts, generator=g))
    return gate


GATE_CONFIGS = [
    dict(score_func="sigmoid"),
    dict(score_func="softmax", route_scale=2.5),
    dict(score_func="sigmoid", n_routed_experts=12, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
         route_scale=1.7),
    dict(score_func="softmax", n_routed_experts=12, n_expert_groups=3, n_limited_groups=1, n_activated_experts=2),
]


# -----------------------------------------------------------------------------
# Gate

@pytest.mark.gate
@pytest.mark.parametrize("kw", GATE_CONFIGS)
def test_gate_matches_brute_force_per_token_router(kw):
    cfg = tiny_cfg(**kw)
    # softmax scores are ~1/E: a smaller bias keeps it comparable to the score gaps
    gate = random_gate(cfg, bias_std=0.1 if cfg.score_func == "sigmoid" else 0.02)
    x = torch.randn(64, cfg.dim)
    weights, indices, scores = gate(x)
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    assert weights.shape == indices.shape == (64, k) and scores.shape == (64, E)
    logits = x.double() @ gate.weight.detach().double().T
    exp_scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    torch.testing.assert_close(scores.double(), exp_scores, atol=1e-6, rtol=1e-6)  # un-biased scores
    expected = torch.zeros(64, E, dtype=torch.float64)
    for n in range(64):
        for e, w in brute_route(x[n], gate.weight.detach(), gate.bias, cfg).items():
            expected[n, e] = w
    got = dense(weights, indices, E)
    assert torch.equal(got != 0, expected != 0), "chose different experts"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # the bias changed at least one choice here, so the test does see whether it is used
    unbiased = torch.topk(exp_scores, k, dim=-1).indices
    assert not torch.equal(dense(torch.ones(64, k), unbiased, E) != 0, got != 0)


@pytest.mark.gate
@pytest.mark.parametrize("kw", GATE_CONFIGS)
def test_gate_picks_exactly_k_distinct_experts_per_token(kw):
    cfg = tiny_cfg(**kw)
    gate = random_gate(cfg, seed=1)
    _, indices, _ = gate(torch.randn(200, cfg.dim))
    assert indices.shape == (200, cfg.n_activated_experts)
    assert indices.min() >= 0 and indices.max() < cfg.n_routed_experts
    for row in indices.tolist():
        assert len(set(row)) == cfg.n_activated_experts


@pytest.mark.gate
@pytest.mark.parametrize("kw", GATE_CONFIGS)
def test_large_bias_forces_expert_but_weight_comes_from_unbiased_score(kw):
    cfg = tiny_cfg(**kw)
    gate = random_gate(cfg, seed=2, bias_std=0.0)
    j = 5
    with torch.no_grad():
        gate.bias[j] = 10.0
    x = torch.randn(50, cfg.dim)
    weights, indices, _ = gate(x)
    assert (indices == j).any(dim=1).all(), "expert with a huge bias not chosen for every token"
    logits = x.double() @ gate.weight.detach().double().T
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    chosen_scores = scores.gather(1, indices)
    w_j = weights.double()[indices == j]
    if cfg.score_func == "sigmoid":     # normalised over the chosen experts' un-biased scores
        expected = scores[:, j] / chosen_scores.sum(1) * cfg.route_scale
    else:                               # softmax: the probability itself
        expected = scores[:, j] * cfg.route_scale
    torch.testing.assert_close(w_j, expected, atol=1e-6, rtol=1e-6)
    assert (weights < 1.5 * cfg.route_scale).all()  # the 10.0 never leaks into a weight


@pytest.mark.gate
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_router_math_stays_fp32_under_bf16_autocast(score_func):
    """On a GPU the model runs under bf16 autocast, which would cast the router's matmul to bf16
    and let rounding flip which experts a token picks: the gate must give, in fp32, the scores and
    choices it gives without autocast (and the brute-force router's weights)."""
    cfg = tiny_cfg(score_func=score_func)
    gate = random_gate(cfg, bias_std=0.01)
    x = torch.randn(256, cfg.dim)
    ref = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate(x)
    assert got[2].dtype == torch.float32 and got[0].dtype == torch.float32
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    want = [brute_route(x[t], gate.weight, gate.bias, cfg) for t in range(x.size(0))]
    assert torch.allclose(dense(*got[:2], cfg.n_routed_experts),
                          dense(*ref[:2], cfg.n_routed_experts))
    assert all(set(w) == set(got[1][t].tolist()) for t, w in enumerate(want))


@pytest.mark.gate
def test_group_limited_routing_uses_sum_of_top2_biased_scores():
    # 12 experts in 3 groups of 4, keep 1 group, top-2. Hand-set logits so that the group with the
    # single best expert (group 0) loses to group 1 on the sum of its top 2.
    cfg = tiny_cfg(n_routed_experts=12, n_expert_groups=3, n_limited_groups=1, n_activated_experts=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, :12] = torch.eye(12)          # logits = x[:12]
        gate.bias.zero_()
    x = torch.zeros(2, cfg.dim)
    x[0, :12] = torch.tensor([5.0, -5, -5, -5, 2, 2, -5, -5, -5, -5, -5, -5])
    # second token: the biases decide — group 2 wins only after its bias is added
    x[1, :12] = torch.tensor([1.0, 1, -5, -5, -5, -5, -5, -5, 0.5, 0.5, -5, -5])
    with torch.no_grad():
        gate.bias[8] = gate.bias[9] = 0.3
    _, indices, _ = gate(x)
    assert sorted(indices[0].tolist()) == [4, 5]
    assert sorted(indices[1].tolist()) == [8, 9]


@pytest.mark.gate
@pytest.mark.parametrize("n_groups, n_limited", [(4, 1), (4, 2), (3, 2), (6, 3)])
def test_group_limited_routing_never_leaves_the_kept_groups(n_groups, n_limited):
    cfg = tiny_cfg(n_routed_experts=12, n_expert_groups=n_groups, n_limited_groups=n_limited,
                   n_activated_experts=2)
    gate = random_gate(cfg, seed=3, bias_std=0.2)
    x = torch.randn(300, cfg.dim)
    _, indices, scores = gate(x)
    per = 12 // n_groups
    biased = scores.double() + gate.bias.double()
    for n in range(300):
        group_score = [sorted(biased[n, g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_groups)]
        group_score = [sum(s) for s in group_score]
        kept = set(sorted(range(n_groups), key=lambda g: -group_score[g])[:n_limited])
        assert {e // per for e in indices[n].tolist()} <= kept, n
    # and the restriction is not vacuous: without groups some token would pick elsewhere
    free = biased.topk(2, dim=-1).indices
    assert not torch.equal(free.sort(1).values, indices.sort(1).values)


# -----------------------------------------------------------------------------
# MoE

def random_moe(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        moe.gate.bias.copy_(0.1 * torch.randn(cfg.n_routed_experts, generator=g))
    return moe


def swiglu(x, mlp):
    w1, w2, w3 = (m.weight.detach().double() for m in (mlp.w1, mlp.w2, mlp.w3))
    h = x.double() @ w1.T
    return (h * torch.sigmoid(h) * (x.double() @ w3.T)) @ w2.T


def moe_by_hand(moe, x):
    cfg = moe.cfg
    B, T, D = x.shape
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            route = brute_route(x[b, t], moe.gate.weight.detach(), moe.gate.bias, cfg)
            y = sum(w * swiglu(x[b, t], moe.experts[e]) for e, w in route.items())
            if moe.shared_experts is not None:
                y = y + swiglu(x[b, t], moe.shared_experts)
            out[b, t] = y
    return out


@pytest.mark.gate
@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_shared_experts=0, score_func="softmax", route_scale=2.0),
    dict(n_shared_experts=2, n_routed_experts=12, n_expert_groups=3, n_limited_groups=2, n_activated_experts=3),
])
def test_moe_output_equals_per_token_loop_over_chosen_experts_plus_shared(kw):
    cfg = tiny_cfg(**kw)
    moe = random_moe(cfg).eval()
    x = torch.randn(3, 7, cfg.dim)
    with torch.no_grad():
        y, aux = moe(x)
    assert y.shape == x.shape and float(aux) == 0.0
    if cfg.n_shared_experts:
        assert moe.shared_experts.w1.weight.shape == (cfg.n_shared_experts * cfg.moe_inter_dim, cfg.dim)
    torch.testing.assert_close(y.double(), moe_by_hand(moe, x), atol=1e-5, rtol=1e-5)


def balance_by_hand(scores, indices, B, E, k, alpha):
    """alpha * sum_i f_i P_i for each sequence, averaged; plain Python loops."""
    N = len(scores)
    T = N // B
    total = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        f = [E / (k * T) * sum(i in indices[t] for t in rows) for i in range(E)]
        P = [sum(scores[t][i] / sum(scores[t]) for t in rows) / T for i in range(E)]
        total += alpha * sum(fi * pi for fi, pi in zip(f, P))
    return total / B


@pytest.mark.balance
def test_balance_loss_equals_formula_on_hand_built_example():
    cfg = tiny_cfg(n_routed_experts=4, n_activated_experts=2, seq_aux_alpha=0.1)
    moe = MoE(cfg)
    # 2 sequences x 3 tokens, 4 experts, top-2; scores deliberately not normalised
    scores = [[0.9, 0.2, 0.6, 0.1],
              [0.3, 0.8, 0.7, 0.4],
              [0.5, 0.5, 0.2, 0.9],
              [0.1, 0.2, 0.3, 0.4],
              [0.8, 0.9, 0.1, 0.6],
              [0.7, 0.1, 0.9, 0.2]]
    indices = [[0, 2], [1, 2], [3, 0],      # sequence 0: f = 4/6 * [2, 1, 2, 1]
               [3, 2], [1, 3], [2, 3]]      # sequence 1: f = 4/6 * [0, 1, 2, 3]
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    loss = moe.balance_loss(s, torch.tensor(indices), 2)
    expected = balance_by_hand(scores, indices, 2, 4, 2, 0.1)
    # the number worked with exact fractions: seq 0 -> 0.1026936..., seq 1 -> 0.1005361..., mean:
    assert abs(expected - 0.1016148325) < 1e-9
    assert abs(loss.item() - expected) < 1e-9
    # gradient flows through P only (f is a count): d/ds_tj = alpha/(B T) * (f_j - sum_i f_i s_ti / S_t) / S_t
    loss.backward()
    for t in range(6):
        b = t // 3
        rows = range(b * 3, b * 3 + 3)
        f = [4 / 6 * sum(i in indices[r] for r in rows) for i in range(4)]
        S = sum(scores[t])
        fs = sum(f[i] * scores[t][i] for i in range(4)) / S
        for j in range(4):
            assert abs(float(s.grad[t, j]) - 0.1 / 6 * (f[j] - fs) / S) < 1e-9, (t, j)


@pytest.mark.balance
def test_balance_loss_is_minimal_alpha_for_perfect_balance():
    # uniform scores and every expert chosen equally: f_i = 1, P_i = 1/E -> loss = alpha
    cfg = tiny_cfg(n_routed_experts=4, n_activated_experts=2, seq_aux_alpha=0.3)
    moe = MoE(cfg)
    scores = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert abs(float(moe.balance_loss(scores, indices, 1)) - 0.3) < 1e-6


@pytest.mark.gate
@pytest.mark.balance
def test_moe_train_mode_balance_loss_uses_biased_choice():
    cfg = tiny_cfg(seq_aux_alpha=0.01)
    moe = random_moe(cfg, seed=4).train()
    with torch.no_grad():
        moe.gate.bias[6] = 5.0           # expert 6 chosen by every token, whatever its score
    x = torch.randn(3, 5, cfg.dim)
    with torch.no_grad():
        _, aux = moe(x)
    flat = x.reshape(-1, cfg.dim)
    logits = flat.double() @ moe.gate.weight.detach().double().T
    scores = logits.sigmoid().tolist()
    indices = [list(brute_route(r, moe.gate.weight.detach(), moe.gate.bias, cfg)) for r in flat]
    assert all(6 in row for row in indices)
    expected = balance_by_hand(scores, indices, 3, cfg.n_routed_experts, cfg.n_activated_experts, 0.01)
    assert abs(float(aux) - expected) < 1e-7


# -----------------------------------------------------------------------------
# expert loads and the auxiliary-loss-free bias update

@pytest.mark.gate
def test_loads_are_counted_from_the_biased_choice_only_in_train_mode():
    cfg = tiny_cfg(seq_aux_alpha=0.0)
    moe = random_moe(cfg, seed=5)
    with torch.no_grad():
        moe.gate.bias[3] = 5.0
    x = torch.randn(2, 6, cfg.dim)
    with torch.no_grad():
        moe.eval()
        moe(x)
        assert moe.gate.load.abs().sum() == 0, "eval mode must not count loads"
        moe.train()
        moe(x)
        moe(x)
    expected = torch.zeros(cfg.n_routed_experts)
    for r in x.reshape(-1, cfg.dim):
        for e in brute_route(r, moe.gate.weight.detach(), moe.gate.bias, cfg):
            expected[e] += 2                              # two train-mode calls
    assert torch.equal(moe.gate.load, expected)
    assert moe.gate.load[3] == 2 * 12 and moe.gate.load.sum() == 2 * 12 * cfg.n_activated_experts


@pytest.mark.rmsnorm_rope  # building a Transformer runs precompute_freqs_cis
@pytest.mark.balance
@pytest.mark.parametrize("gamma", [None, 0.25])
def test_update_router_biases_moves_by_gamma_sign_and_resets_loads(gamma):
    cfg = tiny_cfg(n_layers=3, n_dense_layers=1, bias_update_speed=0.01)
    model = Transformer(cfg)
    gates = model.gates()
    assert len(gates) == 2
    loads = [[5.0, 1, 3, 3, 0, 8, 2, 2],             # mean 3
             [4.0, 4, 4, 4, 4, 4, 4, 12]]            # mean 5
    old = [torch.randn(8) for _ in gates]
    with torch.no_grad():
        for g, l, b in zip(gates, loads, old):
            g.load.copy_(torch.tensor(l))
            g.bias.copy_(b)
    assert torch.equal(model.expert_loads(), torch.tensor(loads))
    returned = model.update_router_biases() if gamma is None else model.update_router_biases(gamma)
    step = cfg.bias_update_speed if gamma is None else gamma
    assert torch.equal(returned.cpu(), torch.tensor(loads))
    for g, l, b in zip(gates, loads, old):
        mean = sum(l) / len(l)
        sign = [(mean > li) - (mean < li) for li in l]   # +1 underloaded, -1 overloaded, 0 at the mean
        torch.testing.assert_close(g.bias, b + step * torch.tensor(sign, dtype=torch.float32), atol=1e-7, rtol=0)
        assert g.load.abs().sum() == 0, "loads not reset"


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.balance
def test_bias_updates_rebalance_a_skewed_token_stream():
    cfg = tiny_cfg(n_layers=1, n_dense_layers=0, n_routed_experts=8, n_activated_experts=2)
    model = Transformer(cfg).train()
    moe = model.layers[0].ffn
    g = torch.Generator().manual_seed(0)
    u = torch.randn(cfg.dim, generator=g)
    u = u / u.norm()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(8, cfg.dim, generator=g) / math.sqrt(cfg.dim))
        moe.gate.weight[0] = 1.5 * u                 # expert 0's logit is 4.5 +- 1.5 for the inputs below,
                                                     # the others' are 0 +- 1
    ratios = []
    with torch.no_grad():
        for _ in range(40):
            x = 3 * u + torch.randn(4, 64, cfg.dim, generator=g)
            moe(x)
            loads = model.update_router_biases(gamma=0.05)[0]
            ratios.append(float(loads.max() / loads.mean()))
    assert ratios[0] > 3.5, ratios[0]                # expert 0 takes (nearly) every token at first
    late = sum(ratios[-10:]) / 10
    assert late < 2.0 and late < 0.5 * ratios[0], ratios
    assert moe.gate.bias[0] < 0 and moe.gate.bias[0] == moe.gate.bias.min()
