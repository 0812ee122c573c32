"""
moe.py -- a tiny DeepSeek-V3: Multi-head Latent Attention (MLA) and DeepSeekMoE.

Only the model lives here; nanor1.py trains it. Names and semantics follow
deepseek-ai/DeepSeek-V3 `inference/model.py`, so a state_dict maps one-to-one onto the
official code (and, by renaming keys, onto HuggingFace's DeepseekV3ForCausalLM):

    embed, layers.{i}.attn_norm, layers.{i}.attn.{wq | wq_a, q_norm, wq_b}, .wkv_a, .kv_norm,
    .wkv_b, .wo, layers.{i}.ffn_norm, layers.{i}.ffn.{w1,w2,w3 | gate, experts.{e}.{w1,w2,w3},
    shared_experts.{w1,w2,w3}}, norm, head

Departures from the official inference code, all deliberate:
  1. forward() returns logits for every position (training needs them) and the balance loss.
  2. The mask (attention_mask) is right for chunked prefill, left padding and packed documents.
  3. The KV cache is an object passed in, not a buffer of the module: one model serves several
     batches (rollouts, evaluation), and training carries no cache around.
  4. Auxiliary-loss-free balancing is trained here: the gate counts its expert loads and
     update_router_biases() applies b_i += gamma * sign(mean_load - load_i) (V3 sec 2.1.2).
  5. No YaRN rope extension, no FP8, no tensor/expert parallelism: the model is tiny.
"""
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """The model's settings, named as in the official ModelArgs (plumbing.validate_model checks)."""
    vocab_size: int = 261           # set by the tokenizer in nanor1.py
    dim: int = 128                  # model width d
    inter_dim: int = 256            # hidden width of the dense SwiGLU layer(s)
    moe_inter_dim: int = 128        # hidden width of each routed (and shared) expert
    n_layers: int = 3
    n_dense_layers: int = 1         # the first layers use a dense FFN instead of MoE
    n_heads: int = 3
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2    # top-k
    n_expert_groups: int = 1        # group-limited routing: experts are split into groups...
    n_limited_groups: int = 1       # ...and each token may only use this many groups
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    route_scale: float = 1.0
    # MLA
    q_lora_rank: int = 0            # 0 = plain wq; >0 = low-rank wq_a -> q_norm -> wq_b
    kv_lora_rank: int = 64          # d_c: width of the compressed KV latent c_KV
    qk_nope_head_dim: int = 16      # per-head query/key width without rope (16 + 16 = v's 32)
    qk_rope_head_dim: int = 16      # per-head rope width (k_R is shared by all heads)
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    # training-only: load balancing (DeepSeek-V3 sec 2.1.2)
    bias_update_speed: float = 1e-3  # gamma in b_i += gamma * sign(mean_load - load_i)
    seq_aux_alpha: float = 1e-4      # alpha of the sequence-wise balance loss

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim


# -----------------------------------------------------------------------------
# Norm and rotary embeddings

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # BEGIN ASSIGNMENT rmsnorm_rope
        # x / sqrt(mean(x^2) + eps) * weight, computed in fp32 for stability
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)
        # END ASSIGNMENT


def precompute_freqs_cis(cfg: ModelConfig) -> torch.Tensor:
    """e^{i * pos * theta_j} for every position and rope pair: (max_seq_len, rope_dim/2)."""
    # BEGIN ASSIGNMENT rmsnorm_rope
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)
    # END ASSIGNMENT


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0,x1),(x2,x3),... of x (B, T, H, d) by freqs_cis (T, d/2)."""
    # BEGIN ASSIGNMENT rmsnorm_rope
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, d/2)
    xc = xc * freqs_cis.view(1, x.size(1), 1, xc.size(-1))
    return torch.view_as_real(xc).flatten(3).type_as(x)
    # END ASSIGNMENT


# -----------------------------------------------------------------------------
# Multi-head Latent Attention

class KVCache:
    """Preallocated per-layer decoding cache for one attention path (attn_impl, as in the
    official code). "absorb" keeps what MLA is designed to keep: per token and layer only the
    normalised latent c_KV (kv_lora_rank floats) and the rotated shared rope key k_pe
    (qk_rope_head_dim floats). "naive" keeps the expanded per-head keys and values, as ordinary
    multi-head attention would, for comparison. key_mask: real (non-padding) tokens."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, attn_impl: str = "absorb",
                 device=None, dtype=torch.float32):
        if attn_impl not in ("absorb", "naive"):
            raise ValueError(f"KVCache attn_impl must be 'absorb' or 'naive', got {attn_impl!r}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds ModelConfig.max_seq_len="
                             f"{cfg.max_seq_len}")
        self.attn_impl, self.max_len = attn_impl, max_len
        B, L, H = batch_size, cfg.n_layers, cfg.n_heads
        new = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)
        if attn_impl == "absorb":
            # one buffer per layer: [c_KV ; k_pe] is the single key every head attends with, and
            # its first kv_lora_rank columns (c_KV) the single value: absorbed MLA is multi-query
            dc = cfg.kv_lora_rank
            self.latent = [new(B, max_len, dc + cfg.qk_rope_head_dim) for _ in range(L)]
            self.kv = [t[..., :dc] for t in self.latent]                   # c_KV (views)
            self.pe = [t[..., dc:] for t in self.latent]                   # k_pe (views)
        else:
            self.k = [new(B, max_len, H, cfg.qk_head_dim) for _ in range(L)]
            self.v = [new(B, max_len, H, cfg.v_head_dim) for _ in range(L)]
        self.key_mask = torch.ones(B, max_len, dtype=torch.bool, device=device)

    def bytes_per_token(self) -> int:
        tensors = self.latent if self.attn_impl == "absorb" else (self.k + self.v)
        return sum(t[0, 0].numel() * t.element_size() for t in tensors)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.n_heads
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, H * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        # W_DKV and W_KR in one matrix: x -> [c_KV ; k_pe]
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        # W_UK and W_UV in one matrix: c_KV -> per head [k_nope ; v]
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                               bias=False)
        self.wo = nn.Linear(H * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = cfg.qk_head_dim ** -0.5

    def forward(self, x, start_pos, freqs_cis, mask, cache: Optional[KVCache] = None,
                layer: int = 0, attn_impl: str = "naive"):
        """x: (B, T, dim). mask: None (plain causal) or bool (B, 1, T, end_pos), True = attend."""
        cfg, (B, T, _) = self.cfg, x.shape
        H, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        end_pos = start_pos + T
        q = self.wq(x) if cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)   # (B, T, H, dn | dr)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = self.wkv_a(x).split([cfg.kv_lora_rank, dr], dim=-1)    # (B, T, dc), (B, T, dr)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)              # (B, T, 1, dr): one head
        kv = self.kv_norm(kv)                                              # c_KV
        if attn_impl == "absorb":
            out = self._absorbed_attention(q_nope, q_pe, kv, k_pe.squeeze(2), start_pos, mask,
                                           cache, layer)
        elif attn_impl == "naive":
            # expand the latent into per-head keys and values, then ordinary attention
            k_nope, v = self.wkv_b(kv).view(B, T, H, dn + dv).split([dn, dv], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)                          # (B, T, H, dn+dr)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)    # (B, T, H, dn+dr)
            if cache is not None:
                cache.k[layer][:B, start_pos:end_pos] = k
                cache.v[layer][:B, start_pos:end_pos] = v
                k, v = cache.k[layer][:B, :end_pos], cache.v[layer][:B, :end_pos]
            if dv != dn + dr:  # fused SDPA kernels want one head dim for q, k, v: pad v with zeros
                v = F.pad(v, (0, dn + dr - dv))
            # softmax(q k^T * scale) v; SDPA does the softmax in fp32 on every backend
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                is_causal=mask is None and T > 1, scale=self.softmax_scale)
            out = out.transpose(1, 2)[..., :dv]                            # (B, T, H, dv)
        else:
            raise ValueError(f"attn_impl must be 'naive' or 'absorb', got {attn_impl!r}")
        return self.wo(out.flatten(2))

    def _absorbed_attention(self, q_nope, q_pe, kv, k_pe, start_pos, mask, cache, layer):
        """Attention computed on the latent kv = c_KV: never materialises per-head keys or values.

        q_nope . k_nope = q_nope . (W_UK c) = (W_UK^T q_nope) . c, so fold W_UK into the query;
        sum_t p_t v_t = W_UV (sum_t p_t c_t), so apply W_UV after attention.
        """
        # BEGIN ASSIGNMENT mla_absorb
        cfg, (B, T) = self.cfg, q_nope.shape[:2]
        H, dn, dv, dc = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        end_pos = start_pos + T
        wkv_b = self.wkv_b.weight.view(H, dn + dv, dc)                       # (H, dn+dv, dc)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, wkv_b[:, :dn])        # (B, T, H, dc)
        q = torch.cat([q_lat, q_pe], dim=-1).flatten(1, 2)                   # (B, T*H, dc+dr)
        latent = torch.cat([kv, k_pe], dim=-1)                               # (B, T, dc+dr)
        if cache is not None:
            cache.latent[layer][:B, start_pos:end_pos] = latent
            latent = cache.latent[layer][:B, :end_pos]                       # (B, S, dc+dr)
        # q_lat . c_KV + q_pe . k_pe in one product: every head shares the key [c_KV ; k_pe]
        scores = (q @ latent.transpose(1, 2)).view(B, T, H, end_pos) * self.softmax_scale
        if mask is None:  # plain causal from position 0: (T, 1, S)
            mask = torch.ones(T, end_pos, dtype=torch.bool, device=q.device).tril(start_pos)
            mask = mask[:, None]
        else:
            mask = mask.transpose(1, 2)                                      # (B, T, 1, S)
        probs = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).type_as(q)
        out = (probs.flatten(1, 2) @ latent[..., :dc]).view(B, T, H, dc)     # the values are c_KV
        return torch.einsum("bthc,hdc->bthd", out, wkv_b[:, dn:])            # (B, T, H, dv)
        # END ASSIGNMENT


# -----------------------------------------------------------------------------
# Feed-forward: dense SwiGLU, routed experts, gate, MoE

class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Used for dense layers, routed experts and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Top-k router with DeepSeek-V3's bias for choosing (not weighting) experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # b_i: added to the scores only to choose experts; updated by update_router_biases, not SGD
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # tokens routed to each expert since the last bias update (from the biased choice)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x):
        """x: (N, dim) -> weights (N, k), indices (N, k), scores (N, E) un-biased, in fp32."""
        # BEGIN ASSIGNMENT gate
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):    # router math in fp32, also where
            logits = F.linear(x.float(), self.weight.float())  # autocast would make it bf16
        scores = logits.softmax(dim=-1) if cfg.score_func == "softmax" else logits.sigmoid()
        choice = scores + self.bias                                              # (N, E)
        if cfg.n_expert_groups > 1:
            grouped = choice.view(x.size(0), cfg.n_expert_groups, -1)            # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)            # (N, G)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(cfg.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, indices)                          # from the un-biased scores
        if cfg.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * cfg.route_scale, indices, scores
        # END ASSIGNMENT


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)

    def forward(self, x):
        """x: (B, T, dim) -> (output (B, T, dim), sequence-wise balance loss (scalar))."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)                     # (N, k), (N, k), (N, E)
        counts = torch.bincount(indices.flatten(), minlength=self.cfg.n_routed_experts)
        if self.training:
            self.gate.load += counts.float()
        # dispatch: sort the (token, slot) pairs by expert, gather their inputs once, run each
        # expert once on its contiguous slice, and scatter-add the weighted outputs back at once
        order = indices.flatten().argsort(stable=True)
        token_of = order // indices.size(1)
        x_sorted = flat.index_select(0, token_of)                               # (N*k, dim)
        outs = [self.experts[e](x_e) for e, x_e in enumerate(x_sorted.split(counts.tolist()))
                if len(x_e)]
        w_sorted = weights.flatten()[order].unsqueeze(1).to(flat.dtype)         # (N*k, 1)
        y = torch.zeros_like(flat).index_add_(0, token_of, torch.cat(outs) * w_sorted)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        train_aux = self.training and self.cfg.seq_aux_alpha > 0
        aux = self.balance_loss(scores, indices, B) if train_aux else flat.new_zeros(())
        return y.view(B, T, D), aux

    def balance_loss(self, scores, indices, batch_size):
        """alpha * sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eqs. 17-20).

        f_i = E/(k T) * #tokens of the sequence that chose expert i (from the biased choice),
        P_i = mean over the sequence's tokens of s_i / sum_j s_j. Only P carries gradient.
        """
        # BEGIN ASSIGNMENT balance
        cfg = self.cfg
        E, k = cfg.n_routed_experts, cfg.n_activated_experts
        T = scores.size(0) // batch_size
        chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0).view(batch_size, T, E)
        f = chosen.sum(1) * E / (k * T)                                          # (B, E)
        P = (scores / scores.sum(-1, keepdim=True)).view(batch_size, T, E).mean(1)  # (B, E)
        return cfg.seq_aux_alpha * (f * P).sum(-1).mean()
        # END ASSIGNMENT


# -----------------------------------------------------------------------------
# The transformer

class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x, start_pos, freqs_cis, mask, cache, layer, attn_impl):
        x = x + self.attn(self.attn_norm(x), start_pos, freqs_cis, mask, cache, layer, attn_impl)
        h = self.ffn(self.ffn_norm(x))
        h, aux = h if isinstance(h, tuple) else (h, x.new_zeros(()))
        return x + h, aux


def attention_mask(B: int, start_pos: int, end_pos: int, key_mask=None, doc_ids=None,
                   device=None) -> torch.Tensor:
    """-> bool (B, 1, T, end_pos), True = attend, for the queries at start_pos..end_pos-1: query i
    (absolute start_pos+i) sees key j iff j <= start_pos+i (causal), j is not padding (key_mask
    (B, end_pos)) and j is in the same document (doc_ids (B, T) of a packed row, no cache). A
    query always sees itself, so no row softmaxes over nothing."""
    pos_q = torch.arange(start_pos, end_pos, device=device)
    pos_k = torch.arange(end_pos, device=device)
    mask = (pos_k[None, :] <= pos_q[:, None]).expand(B, end_pos - start_pos, end_pos)
    if key_mask is not None:
        mask = mask & key_mask[:, None, :]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return (mask | (pos_k[None, None, :] == pos_q[None, :, None])).unsqueeze(1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Init: N(0, 0.02) for every matrix (embedding and gate included), with the projections
        that write into the residual stream (wo, w2) scaled by 1/sqrt(2 n_layers) as in GPT-2;
        norms at 1, router biases at 0."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers) if residual
                                else 0.02)
            else:
                nn.init.ones_(p)
        for m in self.modules():
            if isinstance(m, Gate):
                m.bias.zero_()
                m.load.zero_()

    def forward(self, tokens, start_pos: int = 0, cache: Optional[KVCache] = None,
                key_mask: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None,
                attn_impl: Optional[str] = None):
        """tokens: (B, T) -> (logits (B, T, vocab), balance loss summed over MoE layers).

        start_pos: position of tokens[:, 0] (decoding with a cache). key_mask: (B, T) bool, False
        for left padding; a cache keeps it, so later steps keep ignoring the pads. doc_ids: (B, T)
        for rows packed with documents: each attends to itself only, as a prompt alone would.
        attn_impl: "naive" or "absorb" (default: the cache's, or "naive" without one)."""
        B, T = tokens.shape
        end_pos = start_pos + T
        if end_pos > self.cfg.max_seq_len:
            raise ValueError(f"sequence end {end_pos} exceeds ModelConfig.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        if start_pos > 0 and cache is None:
            raise ValueError("start_pos > 0 needs the KV cache of the earlier positions")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids is for packed training rows, not for cached decoding")
        attn_impl = attn_impl or (cache.attn_impl if cache is not None else "naive")
        if cache is not None and key_mask is not None:
            cache.key_mask[:B, start_pos:end_pos] = key_mask
        keys = cache.key_mask[:B, :end_pos] if cache is not None else key_mask
        mask = None   # plain causal: the attention kernels build it themselves
        if cache is not None or key_mask is not None or doc_ids is not None:
            mask = attention_mask(B, start_pos, end_pos, keys, doc_ids, tokens.device)
        freqs_cis = self.freqs_cis[start_pos:end_pos]
        x = self.embed(tokens)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, start_pos, freqs_cis, mask, cache, i, attn_impl)
            aux_total = aux_total + aux
        return self.head(self.norm(x)), aux_total

    # --- auxiliary-loss-free load balancing (V3 sec 2.1.2), and accounting -----------------

    def gates(self):
        return [m for m in self.modules() if isinstance(m, Gate)]

    def expert_loads(self) -> torch.Tensor:
        """(n_moe_layers, n_routed_experts): tokens routed to each expert since the last update."""
        gates = self.gates()
        return torch.stack([g.load for g in gates]) if gates else \
            torch.zeros(0, self.cfg.n_routed_experts)

    @torch.no_grad()
    def update_router_biases(self, gamma: Optional[float] = None) -> torch.Tensor:
        """b_i += gamma * sign(mean_load - load_i) for every MoE layer; call after optimizer.step().

        Loads are summed over DDP ranks first, so every rank applies the same update. Returns the
        loads used (n_moe_layers, E) for logging, and resets the counters.
        """
        # BEGIN ASSIGNMENT balance
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        gates = self.gates()
        if not gates:
            return torch.zeros(0, self.cfg.n_routed_experts)
        loads = torch.stack([g.load for g in gates])                            # (L_moe, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads)
        for g, load in zip(gates, loads):
            g.bias += gamma * torch.sign(load.mean() - load)
            g.load.zero_()
        return loads.cpu()
        # END ASSIGNMENT

    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Total parameters, or those one token uses (shared + k of the E routed experts)."""
        n = routed = 0
        for name, p in self.named_parameters():
            if not embedding and name.startswith("embed."):
                continue
            if active and ".experts." in name:
                routed += p.numel()
            else:
                n += p.numel()
        return n + routed * self.cfg.n_activated_experts // self.cfg.n_routed_experts

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * active non-embedding params, plus
        attention scores and values 6 L H (qk_head_dim + v_head_dim) T (nanoGPT/PaLM style)."""
        c = self.cfg
        attn = 6 * c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
        return 6 * self.num_params(active=True, embedding=False) + attn
