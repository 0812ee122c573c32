"""
Benchmarks of nanor1 on this machine, run by hand (pytest does not collect this file):

    python tests/bench.py                      # everything, default CPU config (~5 min on 2 cores)
    python tests/bench.py --quick              # smoke test: tiny shapes, one round, numbers meaningless
    python tests/bench.py --only peak,train --reps 7 --threads 1
    python tests/bench.py --init_from out/base.pt   # decode and GRPO with trained weights

It prints a table and writes out/bench.json (--out). Sections (--only):
  peak    large square matmuls, fp32 and (where the CPU has it) bf16: the peaks MFU is measured against
  train   pretraining step (forward, backward, clip, AdamW, router-bias update) of the default model at
          the default shape (batch 32 x block 128): tokens/s, MFU, MoE vs a dense model with the same
          active parameters, plain causal vs nanor1's per-document mask, bf16 autocast, HF peer
  decode  rollout sampling, batch 64, 64 new tokens after a prompt: absorbed MLA cache, naive (expanded
          per-head k/v) cache, no cache (recompute the prefix every step), nanor1.generate, HF generate
  grpo    whole GRPO steps of the default config through nanor1.grpo: generation vs update time
HuggingFace's DeepseekV3ForCausalLM is the peer when transformers is installed (it is not a
requirement). It gets nanor1's weights, renamed, and the logits are compared to check the mapping.
train_vs_hf compares nanor1's real step (per-document mask) with HF's plain causal one;
decode_vs_hf compares nanor1.generate (absorbed cache) with HF generate (its default cache).

Every figure is the median over --reps rounds, and the cases of a section run round-robin within
each round, so a slow spell of a shared machine hits them alike; every ratio is the median of the
per-round ratios, so the spells divide out.
"""
import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nanor1  # noqa: E402
import plumbing  # noqa: E402
from data import training_problems  # noqa: E402
from moe import MLP, KVCache, MoE, Transformer  # noqa: E402
from nanor1 import EOT, Config, enc, generate, make_optimizer, pad_left, pretrain_batches, prompt_tokens  # noqa: E402

CPU = torch.device("cpu")
SECTIONS = ("peak", "train", "decode", "grpo")
TARGETS = {  # key in bench.json: (the goal, at least, and what it measures)
    "train_mfu": (0.40, "training MFU vs the measured fp32 matmul peak"),
    "decode_absorb_vs_nocache": (5.0, "decoding with the absorbed MLA cache vs no cache"),
    "train_vs_hf": (1.5, "nanor1 training tokens/s vs HF DeepseekV3ForCausalLM"),
    "decode_vs_hf": (3.0, "nanor1.generate rollout tokens/s vs HF generate"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--quick", action="store_true", help="tiny shapes and one round: checks that the script runs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per case (the median is reported)")
    p.add_argument("--train_iters", type=int, default=5, help="training steps per round")
    p.add_argument("--batch_size", type=int, default=Config.batch_size, help="training rows")
    p.add_argument("--block_size", type=int, default=Config.block_size, help="training tokens per row")
    p.add_argument("--decode_batch", type=int, default=64, help="sequences decoded together")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens sampled per sequence")
    p.add_argument("--grpo_steps", type=int, default=3, help="timed GRPO steps (after one warm-up step)")
    p.add_argument("--init_from", default="", help="nanor1 checkpoint for the weights (default: random init)")
    p.add_argument("--no_hf", action="store_true", help="skip the HuggingFace peer even if installed")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench.json"), help="where to write the results")
    a = p.parse_args(argv)
    a.only = set(a.only.split(","))
    if a.only - set(SECTIONS):
        p.error(f"--only: unknown sections {sorted(a.only - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if "train" in a.only:
        a.only.add("peak")  # MFU is measured against it
    if a.quick:  # shapes small enough to run in seconds on a busy machine; the numbers mean nothing
        a.reps, a.train_iters, a.batch_size, a.block_size = 1, 1, 4, 128
        a.decode_batch, a.new_tokens, a.grpo_steps = 8, 8, 1
    return a


# -----------------------------------------------------------------------------
# Timing and the machine

def rounds(cases: dict, reps: int, warmup: int = 1) -> dict:
    """cases: {name: fn() -> tokens processed}. Runs every case `warmup` times untimed, then `reps`
    rounds in which each case runs once, round-robin. -> {name: [tokens/s of each round]}."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    rates = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    return rates


def med(xs):
    return statistics.median(xs)


def paired(rates: dict, a: str, b: str) -> float:
    """Median over rounds of rate[a] / rate[b]: each round ran both cases back to back, so a slow
    spell of the machine divides out of the ratio (a ratio of medians would mix rounds)."""
    return med([x / y for x, y in zip(rates[a], rates[b])])


def spread(xs):
    """(max - min) / median of the rounds: how noisy the machine was."""
    return (max(xs) - min(xs)) / med(xs) if len(xs) > 1 else 0.0


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_supported": bf16_supported(), "python": platform.python_version(), "transformers": hf}


def bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def matmul_peak(dtype, n: int, reps: int) -> dict:
    """FLOP/s of an n x n matmul: best and median of `reps` timed products after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t))
    return {"best": max(rates), "median": med(rates), "n": n}


# -----------------------------------------------------------------------------
# Models: nanor1's, a dense one with the same active parameters, HuggingFace's

def nanor1_model(init_from: str = "") -> Transformer:
    if init_from:
        return plumbing.load_checkpoint(init_from, CPU)[0]
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(Config().model, vocab_size=enc.n_vocab))


def dense_twin(model: Transformer) -> Transformer:
    """The same model with every MoE replaced by one SwiGLU as wide as the experts a token uses
    (shared + top-k), so it has the same active parameters (less the small router)."""
    c = model.cfg
    dense = Transformer(c)
    for block in dense.layers:
        if isinstance(block.ffn, MoE):
            block.ffn = MLP(c.dim, c.moe_inter_dim * (c.n_shared_experts + c.n_activated_experts))
    dense.reset_parameters()
    return dense


def hf_twin(model: Transformer):
    """HuggingFace DeepseekV3ForCausalLM with nanor1's config and weights, or None without transformers."""
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        return None
    c = model.cfg
    if c.score_func != "sigmoid":
        raise SystemExit("the HF peer needs score_func=sigmoid (DeepSeek-V3's); pass --no_hf")
    hf_cfg = DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.inter_dim,
        moe_intermediate_size=c.moe_inter_dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads, n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
        num_experts_per_tok=c.n_activated_experts, first_k_dense_replace=c.n_dense_layers,
        n_group=c.n_expert_groups, topk_group=c.n_limited_groups, routed_scaling_factor=c.route_scale,
        norm_topk_prob=True, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        max_position_embeddings=c.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        rope_interleave=True,  # nanor1 rotates consecutive pairs, as the official code does
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)
    hf = DeepseekV3ForCausalLM(hf_cfg)
    # nanor1 names -> HF names, applied in order to the part after "layers.{i}."
    rename = [("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
              ("attn.wq.", "self_attn.q_proj."), ("attn.wq_a.", "self_attn.q_a_proj."),
              ("attn.q_norm.", "self_attn.q_a_layernorm."), ("attn.wq_b.", "self_attn.q_b_proj."),
              ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."), ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
              ("attn.wkv_b.", "self_attn.kv_b_proj."), ("attn.wo.", "self_attn.o_proj."),
              ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.", "mlp."),
              ("w1.", "gate_proj."), ("w3.", "up_proj."), ("w2.", "down_proj.")]
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
    new = {}
    for k, v in model.state_dict().items():
        if k in top:
            new[top[k]] = v
        elif ".experts." not in k:  # routed experts are stacked below
            _, i, rest = k.split(".", 2)
            for ours, theirs in rename:
                rest = rest.replace(ours, theirs)
            new[f"model.layers.{i}.{rest}"] = v
    for i, block in enumerate(model.layers):
        if isinstance(block.ffn, MoE):
            ex = block.ffn.experts
            new[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([e.w1.weight, e.w3.weight]) for e in ex])
            new[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([e.w2.weight for e in ex])
    missing, unexpected = hf.load_state_dict(new, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise SystemExit(f"HF weight mapping is off: missing {missing}, unexpected {unexpected}")
    return hf


# -----------------------------------------------------------------------------
# Cases: each is a closure that does one round of work and returns the tokens it processed

def train_case(model, batches, iters, ctx, doc_mask=True, hf=False):
    """One round = `iters` pretraining steps as nanor1.pretrain does them (data made in advance)."""
    opt = make_optimizer(model, Config.lr, Config.weight_decay, CPU)
    model.train()
    data = itertools.cycle(batches)

    def run():
        for _ in range(iters):
            x, y = next(data)
            with ctx:
                if hf:
                    logits, aux = model(input_ids=x).logits, 0.0
                else:
                    logits, aux = model(x, doc_ids=(x == EOT).cumsum(1) if doc_mask else None)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), Config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not hf:
                model.update_router_biases()
        return iters * x.numel()
    return run


@torch.no_grad()
def decode(model, tokens, key_mask, new_tokens, kind, gen):
    """Sample new_tokens for every row after a left-padded prompt, never stopping early, so every
    kind does the same work. kind: absorb | naive (KVCache kinds) | nocache (recompute the prefix)."""
    B, P = tokens.shape
    sample = lambda logits: nanor1.sample(logits[:, -1].float().softmax(-1), gen)[:, None]  # (B, 1), as generate
    if kind == "nocache":
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, sample(model(tokens, key_mask=key_mask)[0])], 1)
            key_mask = F.pad(key_mask, (0, 1), value=True)
        return tokens
    cache = KVCache(model.cfg, B, P + new_tokens, attn_impl=kind)
    logits, _ = model(tokens, cache=cache, key_mask=key_mask)
    out = []
    for t in range(new_tokens):
        out.append(sample(logits))
        if t + 1 < new_tokens:
            logits, _ = model(out[-1], start_pos=P + t, cache=cache)
    return torch.cat(out, 1)


def cache_bytes(cfg, B, max_len) -> dict:
    """Bytes per cached token, all layers: from the shapes, and from the tensors a KVCache allocates."""
    f32 = torch.finfo(torch.float32).bits // 8
    analytic = {"absorb": cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * f32,
                "naive": cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * f32, "nocache": 0}
    allocated = {"nocache": 0}
    for kind in ("absorb", "naive"):
        c = KVCache(cfg, B, max_len, attn_impl=kind)
        tensors = c.kv + c.pe if kind == "absorb" else c.k + c.v
        allocated[kind] = sum(t.numel() * t.element_size() for t in tensors) / (B * max_len)
    return {"analytic": analytic, "allocated": allocated,
            "key_mask_bytes_per_token": 1}  # the bool padding mask, the same for both kinds


# -----------------------------------------------------------------------------
# Sections

def bench_peak(a, res):
    n = 256 if a.quick else 2048
    res["peak_fp32"] = matmul_peak(torch.float32, n, 3 if a.quick else 10)
    if bf16_supported():
        res["peak_bf16"] = matmul_peak(torch.bfloat16, n, 3 if a.quick else 10)
    for k in ("peak_fp32", "peak_bf16"):
        if k in res:
            print(f"{k:<10} {res[k]['best'] / 1e9:7.1f} GFLOP/s best, {res[k]['median'] / 1e9:7.1f} median "
                  f"({res[k]['n']}x{res[k]['n']} matmul)")


def bench_train(a, res):
    model = nanor1_model()  # training starts from scratch: never a checkpoint
    cfg = dataclasses.replace(Config(), batch_size=a.batch_size, block_size=a.block_size)
    gen = pretrain_batches(cfg, random.Random(0), a.batch_size)
    t = time.perf_counter()
    batches = [next(gen) for _ in range(4)]
    res["train_data_ms_per_batch"] = 1000 * (time.perf_counter() - t) / len(batches)
    fp32 = contextlib.nullcontext()
    cases = {"moe": train_case(model, batches, a.train_iters, fp32),
             "moe_causal": train_case(nanor1_model(), batches, a.train_iters, fp32, doc_mask=False),
             "dense": train_case(dense_twin(model), batches, a.train_iters, fp32)}
    if bf16_supported():
        cases["moe_bf16"] = train_case(nanor1_model(), batches, a.train_iters,
                                       nanor1.autocast(dataclasses.replace(cfg, dtype="bfloat16"), CPU))
    hf = None if a.no_hf else hf_twin(model)
    if hf is not None:
        cases["hf"] = train_case(hf, batches, a.train_iters, fp32, hf=True)
        res["hf_impl"] = {"attn": hf.config._attn_implementation,
                          "experts": getattr(hf.config, "_experts_implementation", None)}
    rates = rounds(cases, a.reps)
    res["train_tok_s_rounds"] = rates
    tok_s = {k: med(v) for k, v in rates.items()}
    flops = model.flops_per_token(a.block_size)
    res["train_flops_per_token"] = flops
    res["train_params"] = {"total": model.num_params(), "active": model.num_params(active=True),
                           "dense_twin": dense_twin(model).num_params()}
    res["train_tok_s"] = tok_s["moe"]
    res["train_tok_s_by_case"] = tok_s
    res["moe_vs_dense"] = paired(rates, "moe", "dense")
    res["doc_mask_vs_causal"] = paired(rates, "moe", "moe_causal")
    if "moe_bf16" in rates:
        res["bf16_vs_fp32"] = paired(rates, "moe_bf16", "moe")
    if "peak_fp32" in res:
        res["train_mfu"] = flops * tok_s["moe"] / res["peak_fp32"]["best"]
        res["train_mfu_vs_median_peak"] = flops * tok_s["moe"] / res["peak_fp32"]["median"]
    if "moe_bf16" in tok_s and "peak_bf16" in res:
        res["train_mfu_bf16"] = flops * tok_s["moe_bf16"] / res["peak_bf16"]["best"]
    if "hf" in tok_s:
        res["train_vs_hf"] = paired(rates, "moe", "hf")
        res["train_causal_vs_hf"] = paired(rates, "moe_causal", "hf")
    print(f"train data        {res['train_data_ms_per_batch']:7.1f} ms per batch to make (outside the timings; "
          f"nanor1.pretrain makes it inside its step)")
    for k, v in rates.items():
        print(f"train {k:<11} {med(v) / 1e3:7.1f}k tok/s  (spread {100 * spread(v):3.0f}%)")
    if hf is None and not a.no_hf:
        print("train hf          skipped: transformers is not installed (pip install transformers)")


def bench_decode(a, res):
    model = nanor1_model(a.init_from).eval()
    problems = training_problems(random.Random(1))
    prompts = [prompt_tokens(next(problems)) for _ in range(a.decode_batch)]
    tokens, key_mask = pad_left(prompts, EOT, CPU)
    B, P = tokens.shape
    gen = torch.Generator().manual_seed(0)

    def case(kind):
        return lambda: decode(model, tokens, key_mask, a.new_tokens, kind, gen).size(0) * a.new_tokens

    def nanor1_generate():  # the rollout path itself; it may stop early once every row has ended
        return generate(model, prompts, a.new_tokens, generator=gen)[0].numel()

    cases = {k: case(k) for k in ("absorb", "naive", "nocache")}
    cases["generate"] = nanor1_generate
    hf = None if a.no_hf else hf_twin(model)
    if hf is not None:
        hf.eval()
        with torch.no_grad():  # the weights were mapped right iff the two models agree
            ours = model(tokens, key_mask=key_mask)[0]
            theirs = hf(input_ids=tokens, attention_mask=key_mask.long()).logits
            res["hf_max_logit_diff"] = (ours - theirs)[key_mask].abs().max().item()

        def hf_generate():
            torch.manual_seed(0)
            out = hf.generate(input_ids=tokens, attention_mask=key_mask.long(), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                              use_cache=True, pad_token_id=EOT, eos_token_id=EOT)
            return (out.size(1) - P) * B
        cases["hf_generate"] = hf_generate
    rates = rounds(cases, a.reps)
    tok_s = {k: med(v) for k, v in rates.items()}
    res["decode_shape"] = {"batch": B, "prompt_len": P, "new_tokens": a.new_tokens}
    res["decode_tok_s_rounds"] = rates
    res["decode_tok_s"] = {k: tok_s[k] for k in ("absorb", "naive", "nocache")}
    res["generate_tok_s"] = tok_s["generate"]
    res["decode_absorb_vs_nocache"] = paired(rates, "absorb", "nocache")
    res["decode_absorb_vs_naive"] = paired(rates, "absorb", "naive")
    cb = cache_bytes(model.cfg, B, P + a.new_tokens)
    res["cache_bytes_per_token"] = cb["analytic"]
    res["cache_bytes_per_token_allocated"] = cb["allocated"]
    if "hf_generate" in tok_s:
        res["hf_generate_tok_s"] = tok_s["hf_generate"]
        res["decode_vs_hf"] = paired(rates, "generate", "hf_generate")
        res["decode_absorb_vs_hf"] = paired(rates, "absorb", "hf_generate")
    for k, v in rates.items():
        bpt = f"  cache {cb['analytic'][k]:5d} B/token" if k in cb["analytic"] else ""
        print(f"decode {k:<11} {med(v) / 1e3:7.1f}k tok/s  (spread {100 * spread(v):3.0f}%){bpt}")
    same = cb["analytic"] == cb["allocated"]
    print(f"decode cache bytes/token from the shapes {'match' if same else 'DO NOT match'} the allocated tensors")
    if "hf_max_logit_diff" in res:
        print(f"decode hf logits vs nanor1: max |diff| {res['hf_max_logit_diff']:.1e}")
    elif not a.no_hf:
        print("decode hf_generate skipped: transformers is not installed (pip install transformers)")


def bench_grpo(a, res):
    """Whole steps of nanor1.grpo at the default config; the first one warms up and is dropped."""
    cfg = Config(grpo_steps=a.grpo_steps + 1, grpo_eval_every=0)
    if a.quick:
        cfg = dataclasses.replace(cfg, prompts_per_step=2, group_size=4, max_new_tokens=16)
    model = nanor1_model(a.init_from)
    ref = nanor1_model(a.init_from)
    ref.load_state_dict(model.state_dict())
    shapes = []

    def recording_generate(*args, **kw):  # grpo calls nanor1.generate: note the shapes it produced
        out, prompts = generate(*args, **kw), args[1] if len(args) > 1 else kw["prompts"]
        shapes.append((out[0].shape, max(len(p) for p in prompts), out[1].sum().item()))
        return out

    history = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg.out_dir = tmp
        nanor1.generate = recording_generate
        try:
            nanor1.grpo(cfg, model, ref, CPU, 0, 1, {}, history)  # no held-out set: no evaluations
        finally:
            nanor1.generate = generate
    steps = []
    for rec, ((B, L), P, real) in list(zip(history, shapes))[1:]:
        steps.append({"t_gen": rec["t_gen"], "t_update": rec["t_update"], "B": B, "L": L, "P": P,
                      "gen_tok_s": B * L / rec["t_gen"], "update_tok_s": B * (P + L) / rec["t_update"],
                      "completion_tokens": real})
    g = {k: med([s[k] for s in steps]) for k in ("t_gen", "t_update", "gen_tok_s", "update_tok_s", "L")}
    g["gen_frac"] = g["t_gen"] / (g["t_gen"] + g["t_update"])
    g["rollouts"] = cfg.prompts_per_step * cfg.group_size
    g["max_new_tokens"] = cfg.max_new_tokens
    g["steps"] = steps
    res["grpo"] = g
    print(f"grpo step       {g['t_gen'] + g['t_update']:6.2f}s = gen {g['t_gen']:.2f}s ({100 * g['gen_frac']:.0f}%, "
          f"{g['gen_tok_s'] / 1e3:.1f}k tok/s) + update {g['t_update']:.2f}s ({g['update_tok_s'] / 1e3:.1f}k tok/s); "
          f"{g['rollouts']} rollouts x {g['L']:.0f} sampled tokens")


# -----------------------------------------------------------------------------

def summary(res) -> str:
    lines = ["", f"{'target':<58} {'measured':>9} {'goal':>7}  met"]
    for key, (goal, what) in TARGETS.items():
        if key in res:
            v = res[key]
            shown = f"{100 * v:.0f}%" if key == "train_mfu" else f"{v:.2f}x"
            goal_s = f"{100 * goal:.0f}%" if key == "train_mfu" else f"{goal:.1f}x"
            lines.append(f"{what:<58} {shown:>9} {goal_s:>7}  {'yes' if v >= goal else 'NO'}")
        else:
            lines.append(f"{what:<58} {'-':>9} {'':>7}  not measured")
    if "moe_vs_dense" in res:
        lines.append(f"{'MoE vs dense (same active params) training tokens/s':<58} {res['moe_vs_dense']:>8.2f}x")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = {"machine": machine(), "command": " ".join(["python"] + sys.argv), "quick": a.quick, "reps": a.reps,
           "weights": a.init_from or "random init"}
    m = res["machine"]
    print(f"{m['cpu']} | {m['threads']} threads | torch {m['torch']} ({m['cpu_capability']}) | "
          f"transformers {m['transformers'] or 'not installed'}" +
          (" | QUICK: numbers are meaningless" if a.quick else ""))
    for name, fn in (("peak", bench_peak), ("train", bench_train), ("decode", bench_decode), ("grpo", bench_grpo)):
        if name in a.only:
            fn(a, res)
    print(summary(res))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
