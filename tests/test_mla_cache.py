"""Tests of Multi-head Latent Attention's two paths and the KV cache in moe.py.

The reference for every cached / chunked / padded / absorbed computation is the plain full forward
(naive attention, no cache), which test_model.py checks against an independent implementation.
Markers name the classroom assignments whose code runs.
"""
import math

import pytest
import torch

from moe import KVCache, ModelConfig, Transformer

ABSORB = pytest.param("absorb", marks=pytest.mark.mla_absorb)
NAIVE = "naive"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test sees the same random data, whatever ran before it


def tiny_cfg(**kw):
    base = dict(vocab_size=50, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                n_heads=2, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@torch.no_grad()
def randomize_(model, seed=0):
    """Weights big enough that attention is far from uniform, so a wrong formula shows up well
    above float error; norms and router biases away from 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "embed.weight":
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.dim() == 2:
            # attention weights a bit larger still: sharper, more position-sensitive attention
            boost = 1.5 if ".attn." in name else 1.0
            p.copy_(boost * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    for gate in model.gates():
        gate.bias.copy_(0.05 * torch.randn(gate.bias.shape, generator=g))
    return model


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_(Transformer(tiny_cfg(**kw)), seed=seed).eval()


CONFIGS = [dict(), dict(q_lora_rank=12, n_dense_layers=0, score_func="softmax")]


# -----------------------------------------------------------------------------
# naive vs absorb

@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.mla_absorb
@pytest.mark.parametrize("kw", CONFIGS)
def test_naive_and_absorb_attention_agree_on_full_sequence(kw):
    model = make_model(**kw)
    tokens = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        naive, _ = model(tokens, attn_impl="naive")
        absorb, _ = model(tokens, attn_impl="absorb")
    assert naive.abs().max() > 0.5
    torch.testing.assert_close(absorb, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.mla_absorb
@pytest.mark.parametrize("kw", CONFIGS)
def test_naive_and_absorb_caches_agree_step_by_step(kw):
    model = make_model(**kw)
    tokens = torch.randint(0, 50, (2, 10))
    caches = {k: KVCache(model.cfg, 2, 10, attn_impl=k) for k in ("naive", "absorb")}
    with torch.no_grad():
        for t in range(10):
            out = {k: model(tokens[:, t:t + 1], start_pos=t, cache=c)[0] for k, c in caches.items()}
            torch.testing.assert_close(out["absorb"], out["naive"], atol=1e-5, rtol=1e-5, msg=f"step {t}")


# -----------------------------------------------------------------------------
# cached decoding and chunked prefill == the full forward

@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.parametrize("kind", [NAIVE, ABSORB])
@pytest.mark.parametrize("kw", CONFIGS)
def test_token_by_token_decoding_equals_full_forward(kind, kw):
    model = make_model(**kw)
    T = 11
    tokens = torch.randint(0, 50, (2, T))
    cache = KVCache(model.cfg, 2, T, attn_impl=kind)
    with torch.no_grad():
        full, _ = model(tokens)
        steps = [model(tokens[:, t:t + 1], start_pos=t, cache=cache)[0] for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.parametrize("kind", [NAIVE, ABSORB])
@pytest.mark.parametrize("chunks", [(4, 9), (3, 3, 3, 4), (1, 6, 2, 4), (5, 1, 1, 6)])
def test_chunked_prefill_at_nonzero_start_pos_equals_full_forward(kind, chunks):
    model = make_model()
    T = sum(chunks)
    tokens = torch.randint(0, 50, (2, T))
    cache = KVCache(model.cfg, 2, model.cfg.max_seq_len, attn_impl=kind)   # cache longer than the sequence
    with torch.no_grad():
        full, _ = model(tokens)
        outs, pos = [], 0
        for n in chunks:
            outs.append(model(tokens[:, pos:pos + n], start_pos=pos, cache=cache)[0])
            pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.mla_absorb
def test_cache_used_for_fewer_rows_than_allocated():
    model = make_model()
    tokens = torch.randint(0, 50, (1, 8))
    cache = KVCache(model.cfg, 3, 8, attn_impl="absorb")
    with torch.no_grad():
        full, _ = model(tokens)
        a, _ = model(tokens[:, :5], start_pos=0, cache=cache)
        b, _ = model(tokens[:, 5:], start_pos=5, cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# left padding

def left_pad(seqs, length, seed=0):
    """Left-pad with random (not constant) tokens, so ignoring the mask would change the output."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (len(seqs), length), generator=g)
    key_mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for b, s in enumerate(seqs):
        tokens[b, length - len(s):] = s
        key_mask[b, length - len(s):] = True
    return tokens, key_mask


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.parametrize("attn_impl", [NAIVE, ABSORB])
def test_left_padded_batch_with_key_mask_equals_each_sequence_alone(attn_impl):
    model = make_model()
    seqs = [torch.randint(0, 50, (n,)) for n in (9, 5, 7)]
    tokens, key_mask = left_pad(seqs, 9)
    with torch.no_grad():
        padded, _ = model(tokens, key_mask=key_mask, attn_impl=attn_impl)
        unmasked, _ = model(tokens, attn_impl=attn_impl)
        for b, s in enumerate(seqs):
            alone, _ = model(s[None], attn_impl=attn_impl)
            torch.testing.assert_close(padded[b, 9 - len(s):], alone[0], atol=1e-5, rtol=1e-5)
    # the mask matters: without it, the padded rows see the pad tokens
    assert (unmasked[1, 4:] - padded[1, 4:]).abs().max() > 1e-3


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.parametrize("kind", [NAIVE, ABSORB])
def test_left_padded_prefill_then_cached_decoding_equals_each_sequence_alone(kind):
    # prefill with key_mask stored in the cache; later steps pass no key_mask and must still skip pads
    model = make_model(seed=3)
    n_prompt = [7, 3, 5]                                              # first tokens are the prompt...
    n_new = 4                                                         # ...then this many decoded
    seqs = [torch.randint(0, 50, (n + n_new,)) for n in n_prompt]
    tokens, key_mask = left_pad([s[:n] for s, n in zip(seqs, n_prompt)], 7)
    cache = KVCache(model.cfg, 3, 7 + n_new, attn_impl=kind)
    with torch.no_grad():
        prefill, _ = model(tokens, start_pos=0, cache=cache, key_mask=key_mask)
        steps = []
        for i in range(n_new):
            nxt = torch.stack([s[n + i] for s, n in zip(seqs, n_prompt)])[:, None]
            steps.append(model(nxt, start_pos=7 + i, cache=cache)[0])
        steps = torch.cat(steps, 1)
        for b, (s, n) in enumerate(zip(seqs, n_prompt)):
            alone, _ = model(s[None, :n + n_new])
            torch.testing.assert_close(prefill[b, 7 - n:], alone[0, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(steps[b], alone[0, n:], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# what the cache holds, and how much

@pytest.mark.parametrize("kw", [dict(), dict(n_layers=2, n_heads=3, kv_lora_rank=24, qk_rope_head_dim=6)])
def test_cache_bytes_per_token(kw):
    cfg = tiny_cfg(**kw)
    L, H = cfg.n_layers, cfg.n_heads
    absorb = KVCache(cfg, 2, 16, attn_impl="absorb")
    naive = KVCache(cfg, 2, 16, attn_impl="naive")
    assert absorb.bytes_per_token() == 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L
    assert naive.bytes_per_token() == 4 * H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * L
    assert absorb.bytes_per_token() < naive.bytes_per_token()


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.mla_absorb
def test_absorb_cache_holds_normalised_latent_and_rotated_shared_rope_key():
    # recompute layer 0's cache entries from the weights: kv_norm(c_KV) and RoPE(k_R) at absolute positions
    model = make_model()
    cfg = model.cfg
    T, dc, dr = 6, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    tokens = torch.randint(0, 50, (2, T))
    cache = KVCache(cfg, 2, 10, attn_impl="absorb")
    with torch.no_grad():
        model(tokens, cache=cache)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["embed.weight"][tokens]
    rms = lambda v, w: v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6) * w
    kv = rms(x, sd["layers.0.attn_norm.weight"]) @ sd["layers.0.attn.wkv_a.weight"].T
    c = rms(kv[..., :dc], sd["layers.0.attn.kv_norm.weight"])
    k = kv[..., dc:]
    i = torch.arange(dr // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_theta ** (-2.0 * i / dr)
    a, b = k[..., 0::2], k[..., 1::2]
    k_rot = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)
    torch.testing.assert_close(cache.kv[0][:, :T].double(), c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.pe[0][:, :T].double(), k_rot, atol=1e-5, rtol=1e-5)
    assert cache.kv[0][:, T:].abs().sum() == 0                        # nothing written past the end


# -----------------------------------------------------------------------------
# max_seq_len

@pytest.mark.rmsnorm_rope  # building a Transformer runs precompute_freqs_cis
def test_max_seq_len_overflow_raises_value_error():
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(model.cfg, 1, 17)
    cache = KVCache(model.cfg, 1, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=15, cache=cache)
    with pytest.raises(ValueError):
        KVCache(model.cfg, 1, 8, attn_impl="paged")
