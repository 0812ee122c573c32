"""Tests of the model in moe.py: config validation, RMSNorm, RoPE, causality, parameter and FLOP
accounting, DeepSeek-V3 state_dict names, and a full forward pass recomputed independently.

Every expected value is computed here from a formula, a loop or a plain-torch re-implementation,
never taken from moe.py's own output. Markers name the classroom assignments whose code runs.
"""
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

import plumbing
from moe import ModelConfig, RMSNorm, Transformer, apply_rotary_emb, precompute_freqs_cis


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test sees the same random data, whatever ran before it


TINY_BASE = dict(vocab_size=50, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                 n_heads=2, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, max_seq_len=32)


def tiny_cfg(**kw):
    return ModelConfig(**{**TINY_BASE, **kw})


@torch.no_grad()
def randomize_(model, seed=0):
    """Weights big enough that attention is far from uniform and routing is far from ties, so a
    wrong formula shows up well above float error; norms and router biases away from 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "embed.weight":
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    for gate in model.gates():
        gate.bias.copy_(0.05 * torch.randn(gate.bias.shape, generator=g))
    return model


# -----------------------------------------------------------------------------
# Config validation (no assignment code runs)

@pytest.mark.parametrize("kw, field", [
    (dict(n_routed_experts=4, n_activated_experts=5), "n_activated_experts"),           # top-k > experts
    (dict(n_routed_experts=8, n_expert_groups=3), "n_expert_groups"),                   # 8 % 3 != 0
    (dict(n_routed_experts=8, n_expert_groups=8), "n_expert_groups"),                   # 1 expert per group
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),                                     # odd rope dim
    (dict(n_expert_groups=2, n_limited_groups=3), "n_limited_groups"),                  # limited > groups
    (dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=3),
     "n_activated_experts"),                                                            # k > experts kept
    (dict(n_dense_layers=4), "n_dense_layers"),                                         # > n_layers
    (dict(score_func="relu"), "score_func"),
    (dict(dim=0), "dim"),
    (dict(n_heads=0), "n_heads"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(route_scale=0.0), "route_scale"),
    (dict(max_seq_len=0), "max_seq_len"),
])
def test_config_validation_raises_value_error_naming_the_field(kw, field):
    with pytest.raises(ValueError) as info:
        plumbing.validate_model(tiny_cfg(**kw))
    assert re.search(rf"\b{field}\b", str(info.value)), f"message does not name {field}: {info.value}"


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4, q_lora_rank=8),
    dict(n_dense_layers=0, n_shared_experts=0, score_func="softmax"),
    dict(n_dense_layers=3),                                                      # all dense
    # each rule at its boundary: equality is allowed
    dict(n_routed_experts=4, n_activated_experts=4),                             # top-k = every expert
    dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=4),             # every group kept
    dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2),  # k = experts kept
    dict(n_routed_experts=2, n_expert_groups=1, n_activated_experts=1),
    dict(qk_rope_head_dim=2, q_lora_rank=0, bias_update_speed=0.0, seq_aux_alpha=0.0, max_seq_len=1),
    dict(route_scale=1e-6, n_heads=1, vocab_size=1),
])
def test_config_validation_accepts_valid_configs(kw):
    """A valid config (each rule at its boundary included) is accepted and kept exactly as given.
    Guards against a validation rule stricter than documented (e.g. < for <=) and against
    validation changing a field."""
    cfg = tiny_cfg(**kw)
    plumbing.validate_model(cfg)
    expected = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)}, **TINY_BASE, **kw}
    assert dataclasses.asdict(cfg) == expected


# -----------------------------------------------------------------------------
# RMSNorm and RoPE

@pytest.mark.rmsnorm_rope
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # at 1e-3, mean(x^2) ~ eps: eps placement matters
def test_rmsnorm_matches_hand_formula(scale):
    torch.manual_seed(0)
    dim, eps = 24, 1e-6
    norm = RMSNorm(dim, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    x = torch.randn(3, 5, dim) * scale
    xd, w = x.double(), norm.weight.detach().double()
    expected = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + eps) * w
    out = norm(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.rmsnorm_rope
def test_rmsnorm_keeps_input_dtype_bf16():
    norm = RMSNorm(16)
    x = torch.randn(2, 16).bfloat16()
    assert norm(x).dtype == torch.bfloat16


def rope_loop(x, theta):
    """Explicit interleaved-pair rotation: pair i = (x[2i], x[2i+1]) at position t is rotated by
    angle t * theta^(-2i/d). x: (B, T, H, d)."""
    B, T, H, d = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    xd = x.double()
    for t in range(T):
        for i in range(d // 2):
            ang = t * theta ** (-2.0 * i / d)
            c, s = math.cos(ang), math.sin(ang)
            a, b = xd[:, t, :, 2 * i], xd[:, t, :, 2 * i + 1]
            out[:, t, :, 2 * i] = a * c - b * s
            out[:, t, :, 2 * i + 1] = a * s + b * c
    return out


@pytest.mark.rmsnorm_rope
@pytest.mark.parametrize("theta", [10000.0, 50.0])
def test_rope_is_interleaved_pair_rotation(theta):
    torch.manual_seed(0)
    cfg = tiny_cfg(qk_rope_head_dim=8, rope_theta=theta, max_seq_len=16)
    freqs = precompute_freqs_cis(cfg)
    assert freqs.shape == (16, 4)
    x = torch.randn(2, 11, 3, 8)
    out = apply_rotary_emb(x, freqs[:11])
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), rope_loop(x, theta), atol=2e-5, rtol=1e-5)


@pytest.mark.rmsnorm_rope
def test_rope_offset_slice_rotates_by_absolute_position():
    # freqs_cis[s:e] applied to a chunk = rotation by absolute positions s..e-1 (what decoding uses)
    torch.manual_seed(1)
    cfg = tiny_cfg(qk_rope_head_dim=6, max_seq_len=20)
    freqs = precompute_freqs_cis(cfg)
    x = torch.randn(1, 4, 2, 6)
    out = apply_rotary_emb(x, freqs[9:13])
    padded = torch.cat([torch.zeros(1, 9, 2, 6), x], dim=1)
    torch.testing.assert_close(out.double(), rope_loop(padded, cfg.rope_theta)[:, 9:], atol=2e-5, rtol=1e-5)


@pytest.mark.rmsnorm_rope
def test_rope_dot_product_depends_only_on_position_difference():
    torch.manual_seed(0)
    d, L = 8, 32
    cfg = tiny_cfg(qk_rope_head_dim=d, max_seq_len=L)
    freqs = precompute_freqs_cis(cfg)
    q, k = torch.randn(d), torch.randn(d)
    # q and k placed at every position; rot[p] = rotated vector at position p
    rq = apply_rotary_emb(q.expand(1, L, 1, d).contiguous(), freqs)[0, :, 0].double()
    rk = apply_rotary_emb(k.expand(1, L, 1, d).contiguous(), freqs)[0, :, 0].double()
    dots = rq @ rk.T                                                   # dots[m, n] = q_m . k_n
    for m, n, shift in [(5, 2, 7), (3, 3, 20), (0, 9, 11), (12, 4, 19)]:
        assert abs(dots[m, n] - dots[m + shift, n + shift]) < 1e-4, (m, n, shift)
    # ...and it does depend on the difference (rules out "no rotation at all")
    assert abs(dots[5, 2] - dots[5, 4]) > 1e-3
    assert abs(dots[6, 6] - dots[9, 0]) > 1e-3
    # a rotation preserves norms
    torch.testing.assert_close(rq.norm(dim=-1), q.double().norm().expand(L), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Causality

@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.parametrize("attn_impl", ["naive", pytest.param("absorb", marks=pytest.mark.mla_absorb)])
def test_causality_changing_token_t_changes_only_logits_from_t_on(attn_impl):
    torch.manual_seed(0)
    model = randomize_(Transformer(tiny_cfg())).eval()
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        base, _ = model(tokens, attn_impl=attn_impl)
        for t in (0, 5, 11):
            changed = tokens.clone()
            changed[0, t] = (changed[0, t] + 17) % 50
            out, _ = model(changed, attn_impl=attn_impl)
            if t > 0:
                torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (out[0, t] - base[0, t]).abs().max() > 1e-3, f"logit at {t} ignores token {t}"
            if t < 11:
                assert (out[0, t + 1:] - base[0, t + 1:]).abs().max() > 1e-3, "later positions ignore the past"


# -----------------------------------------------------------------------------
# Parameter and FLOP accounting

def hand_param_count(cfg, active=False, embedding=True):
    D, V, H = cfg.dim, cfg.vocab_size, cfg.n_heads
    dn, dr, dv, dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank == 0:
        q = D * H * (dn + dr)
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr)
    attn = q + D * (dc + dr) + dc + dc * H * (dn + dv) + H * dv * D
    norms = 2 * D
    dense = 3 * D * cfg.inter_dim
    expert = 3 * D * cfg.moe_inter_dim
    n_experts = cfg.n_activated_experts if active else cfg.n_routed_experts
    moe = cfg.n_routed_experts * D + n_experts * expert + cfg.n_shared_experts * expert  # gate + routed + shared
    n_moe = cfg.n_layers - cfg.n_dense_layers
    total = (cfg.n_layers * (attn + norms) + cfg.n_dense_layers * dense + n_moe * moe
             + D + D * V)                                                # final norm + head
    if embedding:
        total += V * D
    return total


@pytest.mark.rmsnorm_rope  # building a Transformer runs precompute_freqs_cis
@pytest.mark.parametrize("kw", [
    dict(q_lora_rank=0),
    dict(q_lora_rank=12, n_shared_experts=2, n_dense_layers=2),
    dict(q_lora_rank=8, n_shared_experts=0, n_dense_layers=0, n_activated_experts=3),
])
def test_param_counts_total_and_active_equal_hand_count(kw):
    cfg = tiny_cfg(**kw)
    model = Transformer(cfg)
    assert model.num_params() == hand_param_count(cfg)
    assert model.num_params(active=True) == hand_param_count(cfg, active=True)
    assert model.num_params(embedding=False) == hand_param_count(cfg, embedding=False)
    assert model.num_params(active=True, embedding=False) == hand_param_count(cfg, True, False)
    # and the hand count agrees with simply counting every tensor
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.rmsnorm_rope
def test_active_param_count_exact_when_k_over_E_not_a_binary_fraction():
    cfg = tiny_cfg(n_routed_experts=6, n_activated_experts=4)
    assert Transformer(cfg).num_params(active=True) == hand_param_count(cfg, active=True)


@pytest.mark.rmsnorm_rope
@pytest.mark.parametrize("kw, T", [(dict(), 16), (dict(q_lora_rank=8, n_dense_layers=0), 7)])
def test_flops_per_token_formula(kw, T):
    cfg = tiny_cfg(**kw)
    model = Transformer(cfg)
    active_non_embedding = hand_param_count(cfg, active=True, embedding=False)
    expected = 6 * active_non_embedding + 6 * cfg.n_layers * cfg.n_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * T
    assert model.flops_per_token(T) == pytest.approx(expected, rel=1e-12)


# -----------------------------------------------------------------------------
# state_dict names: exactly DeepSeek-V3's

def expected_state_dict_shapes(cfg):
    D, V, H = cfg.dim, cfg.vocab_size, cfg.n_heads
    dn, dr, dv, dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    s = {"embed.weight": (V, D), "norm.weight": (D,), "head.weight": (V, D)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        s[p + "attn_norm.weight"] = (D,)
        s[p + "ffn_norm.weight"] = (D,)
        if cfg.q_lora_rank == 0:
            s[p + "attn.wq.weight"] = (H * (dn + dr), D)
        else:
            s[p + "attn.wq_a.weight"] = (cfg.q_lora_rank, D)
            s[p + "attn.q_norm.weight"] = (cfg.q_lora_rank,)
            s[p + "attn.wq_b.weight"] = (H * (dn + dr), cfg.q_lora_rank)
        s[p + "attn.wkv_a.weight"] = (dc + dr, D)
        s[p + "attn.kv_norm.weight"] = (dc,)
        s[p + "attn.wkv_b.weight"] = (H * (dn + dv), dc)
        s[p + "attn.wo.weight"] = (D, H * dv)
        if i < cfg.n_dense_layers:
            s[p + "ffn.w1.weight"] = (cfg.inter_dim, D)
            s[p + "ffn.w2.weight"] = (D, cfg.inter_dim)
            s[p + "ffn.w3.weight"] = (cfg.inter_dim, D)
        else:
            E, mi = cfg.n_routed_experts, cfg.moe_inter_dim
            s[p + "ffn.gate.weight"] = (E, D)
            s[p + "ffn.gate.bias"] = (E,)
            for e in range(E):
                s[p + f"ffn.experts.{e}.w1.weight"] = (mi, D)
                s[p + f"ffn.experts.{e}.w2.weight"] = (D, mi)
                s[p + f"ffn.experts.{e}.w3.weight"] = (mi, D)
            if cfg.n_shared_experts:
                si = cfg.n_shared_experts * mi
                s[p + "ffn.shared_experts.w1.weight"] = (si, D)
                s[p + "ffn.shared_experts.w2.weight"] = (D, si)
                s[p + "ffn.shared_experts.w3.weight"] = (si, D)
    return s


@pytest.mark.rmsnorm_rope
@pytest.mark.parametrize("kw", [dict(q_lora_rank=0), dict(q_lora_rank=12, n_shared_experts=0)])
def test_state_dict_keys_and_shapes_are_exactly_deepseek_v3(kw):
    cfg = tiny_cfg(**kw)
    sd = Transformer(cfg).state_dict()
    expected = expected_state_dict_shapes(cfg)
    assert set(sd) == set(expected), (f"extra: {sorted(set(sd) - set(expected))}, "
                                      f"missing: {sorted(set(expected) - set(sd))}")
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.endswith(".load") or "freqs_cis" in k for k in sd)   # non-persistent buffers


# -----------------------------------------------------------------------------
# A full reference forward, in float64, from the weights alone

def ref_rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, theta):
    """x: (B, T, ..., d); rotate pair (2i, 2i+1) at position t by t * theta^(-2i/d)."""
    d, T = x.shape[-1], x.shape[1]
    i = torch.arange(d // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / d)   # (T, d/2)
    shape = (1, T) + (1,) * (x.dim() - 3) + (d // 2,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def ref_swiglu(x, w):
    return (F.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T


def ref_attention(h, w, cfg):
    B, T, _ = h.shape
    H, dn, dr, dv, dc = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank == 0:
        q = h @ w["wq.weight"].T
    else:
        q = ref_rms(h @ w["wq_a.weight"].T, w["q_norm.weight"]) @ w["wq_b.weight"].T
    q = q.view(B, T, H, dn + dr)
    q_nope, q_rope = q[..., :dn], ref_rope(q[..., dn:], cfg.rope_theta)
    kv = h @ w["wkv_a.weight"].T
    c, k_rope = ref_rms(kv[..., :dc], w["kv_norm.weight"]), ref_rope(kv[..., dc:], cfg.rope_theta)  # (B,T,dc),(B,T,dr)
    kvb = (c @ w["wkv_b.weight"].T).view(B, T, H, dn + dv)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    out = torch.zeros(B, T, H, dv, dtype=torch.float64)
    for b in range(B):
        for hd in range(H):
            scores = (q_nope[b, :, hd] @ k_nope[b, :, hd].T + q_rope[b, :, hd] @ k_rope[b].T) / math.sqrt(dn + dr)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out[b, :, hd] = scores.softmax(-1) @ v[b, :, hd]
    return out.reshape(B, T, H * dv) @ w["wo.weight"].T


def ref_route(x, gate_w, bias, cfg):
    """One token: -> list of (expert, weight)."""
    logits = gate_w @ x
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    biased = (scores + bias).tolist()
    E, G = cfg.n_routed_experts, cfg.n_expert_groups
    per = E // G
    allowed = list(range(E))
    if G > 1:
        gscore = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -gscore[g])[:cfg.n_limited_groups]
        allowed = [e for e in range(E) if e // per in kept]
    chosen = sorted(allowed, key=lambda e: -biased[e])[:cfg.n_activated_experts]
    ws = [scores[e] for e in chosen]
    if cfg.score_func == "sigmoid":
        tot = sum(ws)
        ws = [wt / tot for wt in ws]
    return [(e, wt * cfg.route_scale) for e, wt in zip(chosen, ws)]


def ref_moe(h, w, cfg):
    B, T, D = h.shape
    out = torch.zeros_like(h)
    for b in range(B):
        for t in range(T):
            x = h[b, t]
            y = torch.zeros(D, dtype=torch.float64)
            for e, wt in ref_route(x, w["gate.weight"], w["gate.bias"], cfg):
                y = y + wt * ref_swiglu(x, {n: w[f"experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")})
            if cfg.n_shared_experts:
                y = y + ref_swiglu(x, {n: w[f"shared_experts.{n}.weight"] for n in ("w1", "w2", "w3")})
            out[b, t] = y
    return out


def ref_forward(model, tokens):
    cfg = model.cfg
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    x = sd["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        lw = sub(f"layers.{i}.")
        x = x + ref_attention(ref_rms(x, lw["attn_norm.weight"]), sub(f"layers.{i}.attn."), cfg)
        h = ref_rms(x, lw["ffn_norm.weight"])
        if i < cfg.n_dense_layers:
            x = x + ref_swiglu(h, {n: lw[f"ffn.{n}.weight"] for n in ("w1", "w2", "w3")})
        else:
            x = x + ref_moe(h, sub(f"layers.{i}.ffn."), cfg)
    return ref_rms(x, sd["norm.weight"]) @ sd["head.weight"].T


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.parametrize("kw", [
    dict(q_lora_rank=0, score_func="sigmoid"),
    dict(q_lora_rank=12, score_func="softmax", route_scale=2.5, n_shared_experts=2),
    dict(q_lora_rank=8, score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
         route_scale=1.5, n_dense_layers=0, rope_theta=100.0),
    dict(n_routed_experts=8, n_expert_groups=2, n_limited_groups=1, score_func="softmax", n_shared_experts=0),
])
def test_forward_equals_independent_reference(kw):
    torch.manual_seed(0)
    model = randomize_(Transformer(tiny_cfg(**kw)), seed=1).eval()
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        logits, aux = model(tokens)
    assert logits.shape == (2, 9, 50) and logits.dtype == torch.float32
    assert float(aux) == 0.0  # eval: no balance loss
    expected = ref_forward(model, tokens)
    assert expected.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)
