"""Pretraining lowers the loss on a tiny model; checkpoints round-trip exactly through
torch.load(weights_only=True); a missing or broken checkpoint is one clear line, not a traceback."""
import copy
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

import moe
import nanor1
import plumbing
from nanor1 import enc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model_config():
    return moe.ModelConfig(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_heads=2, kv_lora_rank=16,
                           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                           n_activated_experts=2, vocab_size=enc.n_vocab)


def tiny_config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), device="cpu", pretrain_steps=60, batch_size=8, block_size=128,
                warmup_steps=5, lr=1e-2, log_every=20, eval_every=0, think_frac=0.25, model=tiny_model_config())
    base.update(kw)
    return nanor1.Config(**base)


@torch.no_grad()
def fixed_batch_loss(model, cfg):
    """Cross-entropy on a fixed held-aside batch (its own rng), in eval mode."""
    x, y = next(nanor1.pretrain_batches(cfg, random.Random("fixed-eval-batch"), rows=16))
    was = model.training
    model.eval()
    logits, _ = model(x)
    model.train(was)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1).item()


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.balance
def test_tiny_pretraining_lowers_the_loss(tmp_path):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = moe.Transformer(cfg.model)
    before = fixed_batch_loss(model, cfg)
    assert abs(before - torch.log(torch.tensor(float(enc.n_vocab))).item()) < 0.5   # ~uniform at init
    nanor1.pretrain(cfg, model, torch.device("cpu"), 0, 1, {})
    after = fixed_batch_loss(model, cfg)
    assert after < before - 1.5, (before, after)
    # the metrics log: one record per log_every steps, loss going down
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [20, 40, 60]
    assert all(r["stage"] == "pretrain" for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5, [r["loss"] for r in recs]
    # aux-loss-free balancing ran: router biases moved, by at most gamma per step
    gamma = cfg.model.bias_update_speed
    biases = torch.stack([g.bias for g in model.gates()])
    assert biases.abs().max() > 0
    assert biases.abs().max() <= gamma * cfg.pretrain_steps + 1e-9
    assert len(recs[-1]["expert_load"]) == len(model.gates())


def small_trained_model():
    torch.manual_seed(1)
    model = moe.Transformer(tiny_model_config())
    with torch.no_grad():   # make every weight distinct from init so a partial load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for g in model.gates():
            g.bias.copy_(torch.tensor([0.003, -0.001, 0.002, -0.004]))
    return model


@pytest.mark.rmsnorm_rope
def test_save_checkpoint_round_trips_exact_weights_and_config(tmp_path):
    model = small_trained_model()
    cfg = tiny_config(tmp_path, seed=99, beta=0.125, agg="token", think_frac=0.5)
    path = tmp_path / "ckpt.pt"
    nanor1.save_checkpoint(str(path), model, cfg, stage="pretrain", step=42)
    assert os.listdir(tmp_path) == ["ckpt.pt"], "no temp file left behind"
    ckpt = torch.load(path, weights_only=True)        # plain types only
    sd = model.state_dict()
    assert set(ckpt["model"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ckpt["model"][k], v), k
    assert any(k.endswith("gate.bias") for k in sd), "router biases are part of the checkpoint"
    assert ckpt["model_config"] == dataclasses.asdict(model.cfg)
    assert moe.ModelConfig(**ckpt["model_config"]) == model.cfg
    expected = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "model"}
    assert ckpt["config"] == expected
    assert ckpt["stage"] == "pretrain" and ckpt["step"] == 42


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
def test_load_checkpoint_restores_a_model_with_identical_outputs(tmp_path):
    model = small_trained_model().eval()
    path = str(tmp_path / "ckpt.pt")
    nanor1.save_checkpoint(path, model, tiny_config(tmp_path))
    loaded, ckpt = plumbing.load_checkpoint(path, torch.device("cpu"))
    loaded.eval()
    x = torch.randint(0, enc.n_vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_load_checkpoint_missing_file_is_a_clear_exit(tmp_path):
    path = str(tmp_path / "nope" / "base.pt")
    with pytest.raises(SystemExit) as e:
        plumbing.load_checkpoint(path, torch.device("cpu"))
    msg = e.value.code
    assert isinstance(msg, str), "a message, which Python prints on one line with exit status 1"
    assert path in msg and "not found" in msg
    assert "\n" not in msg


class StandIn(torch.nn.Module):
    """Anything with a state_dict and a cfg can be checkpointed; this keeps the error-path tests free
    of the Transformer (and of the classroom assignments inside it)."""

    def __init__(self):
        super().__init__()
        self.cfg = tiny_model_config()
        self.lin = torch.nn.Linear(64, 64)


def write_truncated_checkpoint(tmp_path):
    model = StandIn()
    path = tmp_path / "truncated.pt"
    nanor1.save_checkpoint(str(path), model, tiny_config(tmp_path))
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    return str(path)


@pytest.mark.parametrize("content", [
    "truncated",
    "garbage",
    "empty",
])
def test_load_checkpoint_broken_file_is_a_clear_exit(tmp_path, content):
    if content == "truncated":
        path = write_truncated_checkpoint(tmp_path)
    else:
        path = str(tmp_path / f"{content}.pt")
        with open(path, "wb") as f:
            f.write(b"this is not a checkpoint\x00\xff" * 10 if content == "garbage" else b"")
    with pytest.raises(SystemExit) as e:
        plumbing.load_checkpoint(path, torch.device("cpu"))
    msg = e.value.code
    assert isinstance(msg, str)
    assert path in msg and "error" in msg.lower()
    assert "\n" not in msg


def test_broken_checkpoint_in_a_real_process_prints_no_traceback(tmp_path):
    path = write_truncated_checkpoint(tmp_path)
    script = "import sys; sys.path.insert(0, sys.argv[1]); import plumbing; plumbing.load_checkpoint(sys.argv[2], 'cpu')"
    r = subprocess.run([sys.executable, "-c", script, ROOT, path], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and lines[0].startswith("error:"), r.stderr


def test_log_every_zero_is_rejected_naming_the_field(tmp_path):
    cfg = tiny_config(tmp_path, pretrain_steps=2, log_every=0)
    with pytest.raises(ValueError, match="log_every"):
        plumbing.validate(cfg)


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.balance
def test_logged_throughput_is_right_for_the_last_partial_interval(tmp_path, monkeypatch):
    """With a fake clock that advances exactly 1 s per training step, every record must say
    batch_size * block_size tokens per second."""
    clock = [1000.0]
    fake_time = types.SimpleNamespace(time=lambda: clock[0], perf_counter=time.perf_counter)
    monkeypatch.setattr(plumbing, "time", fake_time)
    cfg = tiny_config(tmp_path, pretrain_steps=5, log_every=3, batch_size=2, warmup_steps=1)
    torch.manual_seed(0)
    model = moe.Transformer(cfg.model)
    real_update = model.update_router_biases

    def update_and_tick(*a, **k):     # called once per optimizer step
        clock[0] += 1.0
        return real_update(*a, **k)
    model.update_router_biases = update_and_tick
    nanor1.pretrain(cfg, model, torch.device("cpu"), 0, 1, {})
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [3, 5]
    assert recs[0]["tok_s"] == pytest.approx(2 * 128)
    assert recs[1]["tok_s"] == pytest.approx(2 * 128)


# -----------------------------------------------------------------------------
# The optimizer and the schedule

@pytest.mark.rmsnorm_rope
def test_weight_decay_shrinks_matrices_only_never_norms_or_router_biases():
    """One AdamW step of make_optimizer with zero gradients moves nothing but the decay: every
    matrix shrinks by exactly (1 - lr * wd), every vector (the RMSNorm weights) is left as it is,
    and the router biases (buffers, updated by the balancing rule, not SGD) are not the optimizer's
    at all. Guards against weight decay applied to norm weights (or to nothing)."""
    model = small_trained_model()
    lr, wd = 0.05, 0.3
    opt = nanor1.make_optimizer(model, lr, wd, torch.device("cpu"))
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}) == len(list(model.parameters())), \
        "every parameter in exactly one group"
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert not any(p is g.bias for g in model.gates() for p in in_opt)
    vectors = [n for n, p in model.named_parameters() if p.dim() < 2]
    assert any(n.endswith("norm.weight") for n in vectors) and any(p.dim() == 2 for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    params = dict(model.named_parameters())
    for name, value in model.state_dict().items():
        if name in params and params[name].dim() >= 2:
            torch.testing.assert_close(value, before[name] * (1 - lr * wd), rtol=1e-6, atol=0,
                                       msg=lambda m: f"{name}: not decayed by lr * wd: {m}")
        else:   # norm weights, and buffers such as the router biases
            assert torch.equal(value, before[name]), f"{name} changed: no weight decay on vectors or buffers"


def lr_formula(step, total, warmup, base, min_frac, decay_frac):
    """The schedule, written out: linear warmup (step + 1) / warmup; then base, constant, until the
    last round(decay_frac * total) steps (but never inside the warmup); then a cosine from base to
    base * min_frac that ends at step total, flat after it."""
    if step < warmup:
        return base * (step + 1) / warmup
    first = max(warmup, total - round(decay_frac * total))
    if step <= first:
        return base
    t = min(1.0, (step - first) / max(1, total - first))
    return base * min_frac + (base - base * min_frac) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("warmup,total,min_frac,decay_frac", [
    (5, 40, 0.1, 1.0), (1, 10, 0.0, 1.0), (0, 12, 0.25, 1.0), (100, 1800, 0.1, 1.0),
    (5, 40, 0.1, 0.5), (40, 560, 0.1, 0.5), (0, 12, 0.0, 0.25), (10, 20, 0.1, 0.9), (3, 9, 0.2, 0.0)])
def test_lr_schedule_is_linear_warmup_then_constant_then_cosine(warmup, total, min_frac, decay_frac):
    """lr_at against the formula: the first step already trains (base / warmup, not 0), the last
    warmup step is at base, the lr stays at base until the last decay_frac of the steps, and the
    cosine ends at base * min_lr_frac. Guards against a warmup that starts at lr 0 (step / warmup),
    a decay that starts early or late, and a cosine that does not end where it should."""
    base = 3e-3
    cfg = nanor1.Config(warmup_steps=warmup, min_lr_frac=min_frac, decay_frac=decay_frac)
    got = [nanor1.lr_at(s, total, cfg, base) for s in range(total + 3)]
    want = [lr_formula(s, total, warmup, base, min_frac, decay_frac) for s in range(total + 3)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[0] > 0
    if warmup:
        assert got[0] == pytest.approx(base / warmup) and got[warmup - 1] == pytest.approx(base)
    else:
        assert got[0] == pytest.approx(base)
    stable_end = total - round(decay_frac * total)   # steps warmup..stable_end run at base
    assert all(x == pytest.approx(base) for x in got[warmup:stable_end + 1])
    if decay_frac == 0:   # no decay at all: base to the last step
        assert got[total - 1] == pytest.approx(base)
    else:
        assert got[total] == pytest.approx(base * min_frac) and got[-1] == pytest.approx(base * min_frac)
    assert max(got) == pytest.approx(base)


@pytest.mark.rmsnorm_rope
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    """make_optimizer(muon=True): torch.optim.Muon gets exactly the 2-D weights inside the blocks
    (attention, dense FFN, routed and shared experts), AdamW the embedding, the head, the norms and
    the router gates, each parameter in exactly one; a Muon step orthogonalises: with a rank-one
    gradient and zero momentum, the update of a matrix is a multiple of that rank-one direction
    (Newton-Schulz keeps the singular vectors), at AdamW's RMS scale (match_rms_adamw)."""
    model = small_trained_model()
    opt = nanor1.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"), muon=True)
    *muons, adamw = opt.opts
    assert all(isinstance(m, torch.optim.Muon) for m in muons) and isinstance(adamw, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    in_muon = [by_id[id(p)] for m in muons for g in m.param_groups for p in g["params"]]
    assert len(in_muon) == len(set(in_muon)), "a matrix in two Muon shards"
    in_muon = set(in_muon)
    in_adamw = {by_id[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(by_id.values())
    want_muon = {n for n, p in model.named_parameters()
                 if n.startswith("layers.") and p.dim() == 2 and ".gate." not in n}
    assert in_muon == want_muon
    assert {"embed.weight", "head.weight"} <= in_adamw and any(".gate." in n for n in in_adamw)
    assert any(".experts." in n for n in in_muon) and any("shared_experts" in n for n in in_muon)
    name = next(n for n in sorted(in_muon) if n.endswith("attn.wq.weight"))
    w = dict(model.named_parameters())[name]
    A, B = w.shape
    k = min(A, B)
    U, V = torch.linalg.qr(torch.randn(A, k))[0], torch.linalg.qr(torch.randn(B, k))[0]
    grad = U @ torch.diag(torch.logspace(0, -2, k)) @ V.T       # singular values 1 ... 0.01
    size = 1e-2 * 0.2 * max(A, B) ** 0.5                          # match_rms_adamw's lr scale
    steps = []
    for scale in (1.0, 1000.0):    # SGD's step would depend on the gradient's scale
        fresh = nanor1.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"), muon=True)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        w.grad = scale * grad
        before = w.detach().clone()
        fresh.step()
        delta = (w.detach() - before).double()
        with torch.no_grad():
            w.copy_(before)
        m = U.double().T @ delta @ V.double()       # the update in the gradient's singular basis
        diag = -m.diagonal() / size
        off = (m - torch.diag(m.diagonal())).norm() / m.diagonal().norm()
        assert off < 0.05, f"the update does not keep the gradient's singular vectors ({off:.3f})"
        # orthogonalised: a 100x spread of singular values comes out equalised, to within the
        # [0.5, 1.5] that torch's Newton-Schulz coefficients promise (not exactly 1)
        assert 0.5 < diag.min() and diag.max() < 1.5, (diag.min(), diag.max())
        steps.append(delta)
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0.02 * size)


@pytest.mark.rmsnorm_rope
def test_the_embedding_and_head_step_at_embed_lr_mult_times_the_lr():
    """With Muon, the embedding and the head take lr * embed_lr_mult, every other AdamW parameter
    the scheduled lr: checked by Adam's first step, which moves each weight by lr * g/(|g| + eps),
    i.e. by the lr itself for any gradient far above eps (no weight decay here). The multiplier
    survives clipped_step, which sets every group's lr from the schedule each step."""
    model = small_trained_model()
    opt = nanor1.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"), muon=True,
                                lr_mult={"embed.weight": 3.0, "head.weight": 3.0})
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p).sign() * (0.5 + torch.rand_like(p))   # |g| in [0.5, 1.5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = nanor1.Config(grad_clip=1e9)
    plumbing.clipped_step(cfg, model, opt, 2e-3, 1.0, "pretrain", 1, 10, "--lr")
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    for n in ("embed.weight", "head.weight"):
        torch.testing.assert_close(moved[n], torch.full_like(moved[n], 6e-3), rtol=1e-4, atol=0)
    norm = next(n for n in moved if n.endswith("attn_norm.weight") or n.endswith("norm.weight"))
    torch.testing.assert_close(moved[norm], torch.full_like(moved[norm], 2e-3), rtol=1e-4, atol=0)
    gate = next(n for n in moved if ".gate.weight" in n)
    torch.testing.assert_close(moved[gate], torch.full_like(moved[gate], 2e-3), rtol=1e-4, atol=0)
    plain = nanor1.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"))
    assert {g["lr"] for g in plain.param_groups} == {1e-2}   # no multipliers (SFT): one lr


@pytest.mark.rmsnorm_rope
def test_pretrain_steps_the_embedding_and_head_at_embed_lr_mult_times_the_lr(tmp_path):
    """pretrain() with Muon gives the head embed_lr_mult x lr and the norms lr: one step (the
    warmup's first, at the full lr when warmup_steps=1) moves every head weight by Adam's first
    step, lr * embed_lr_mult, give or take the weight decay (lr * wd * w, ~1e-3 of it here)."""
    cfg = tiny_config(tmp_path, pretrain_steps=1, batch_size=4, warmup_steps=1, lr=1e-2,
                      embed_lr_mult=3.0, ckpt_every=0)
    torch.manual_seed(0)
    model = moe.Transformer(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nanor1.pretrain(cfg, model, torch.device("cpu"), 0, 1, {})
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    assert moved["head.weight"].median().item() == pytest.approx(3e-2, rel=0.01)
    assert moved["norm.weight"].median().item() == pytest.approx(1e-2, rel=0.01)


@pytest.mark.rmsnorm_rope
def test_pretrain_gives_muon_the_muon_momentum(tmp_path, monkeypatch):
    """pretrain() builds Muon with --muon_momentum: after two steps with (clipped) gradients g1, g2,
    each hidden matrix's momentum buffer is the exponential average from zero,
    m (1 - m) g1 + (1 - m) g2, computed here from the gradients each step saw."""
    m = 0.6
    cfg = tiny_config(tmp_path, pretrain_steps=2, batch_size=4, warmup_steps=1, muon_momentum=m,
                      ckpt_every=0, eval_every=0)
    built, seen = [], []
    def recording(*a, **k):
        opt = make_optimizer(*a, **k)
        step = opt.step
        def step_and_record():
            seen.append({id(p): p.grad.detach().clone() for s in opt.opts[:-1]
                         for g in s.param_groups for p in g["params"]})
            step()
        opt.step = step_and_record
        built.append(opt)
        return opt
    make_optimizer = nanor1.make_optimizer
    monkeypatch.setattr(nanor1, "make_optimizer", recording)
    torch.manual_seed(0)
    nanor1.pretrain(cfg, moe.Transformer(cfg.model), torch.device("cpu"), 0, 1, {})
    (opt,) = built
    assert len(seen) == 2
    for shard in opt.opts[:-1]:
        for p in shard.param_groups[0]["params"]:
            want = m * (1 - m) * seen[0][id(p)] + (1 - m) * seen[1][id(p)]
            torch.testing.assert_close(shard.state[p]["momentum_buffer"], want, rtol=1e-5, atol=1e-7)


@pytest.mark.rmsnorm_rope
def test_muon_shards_step_side_by_side_and_as_one_muon_would():
    """make_optimizer(muon=True) splits the hidden matrices into two torch.optim.Muon shards that
    plumbing.Optimizers steps at the same time on the CPU, one thread each, when torch has two: the
    shards run in two threads other than the caller's, torch's thread count is back to two after,
    and three steps leave every weight where one torch.optim.Muon over all the matrices (plus the
    same AdamW) leaves it, run serially at one thread (the thread count each shard had)."""
    def fresh():
        torch.manual_seed(0)
        return small_trained_model()
    grads = [[torch.randn_like(p) for p in fresh().parameters()] for _ in range(3)]
    def train(model, opt):
        for g in grads:
            for p, gp in zip(model.parameters(), g):
                p.grad = gp.clone()
            opt.step()
    a = fresh()
    opt_a = nanor1.make_optimizer(a, 1e-2, 0.1, torch.device("cpu"), muon=True)
    *shards, _ = opt_a.opts
    assert len(shards) == 2 and all(s.param_groups[0]["params"] for s in shards)
    where = []
    for s in shards:   # record the thread and torch's thread count each shard steps with
        s.step = (lambda f: lambda *a, **k: (where.append((threading.get_ident(),
                                                           torch.get_num_threads())), f(*a, **k))[1])(s.step)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(a, opt_a)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(where) == 6 and {n for _, n in where} == {1}
    assert threading.get_ident() not in {t for t, _ in where} and len({t for t, _ in where}) == 2
    b = fresh()
    opt_b = nanor1.make_optimizer(b, 1e-2, 0.1, torch.device("cpu"), muon=True)
    hidden = [p for s in opt_b.opts[:2] for g in s.param_groups for p in g["params"]]
    serial = plumbing.Optimizers(torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1,
                                                  adjust_lr_fn="match_rms_adamw"), opt_b.opts[2])
    try:
        torch.set_num_threads(1)
        train(b, serial)
    finally:
        torch.set_num_threads(threads)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{n}: the shards' step is not Muon's"


@pytest.mark.rmsnorm_rope
def test_a_checkpoint_of_muon_and_adamw_restores_both(tmp_path):
    """The two optimizers save and load as one state dict (plumbing.Optimizers): after a restore,
    the next step of a fresh optimizer equals the next step of the original, for both halves.
    Guards against a resume that silently restarts Muon's momentum or AdamW's moments."""
    def fresh():
        torch.manual_seed(0)
        return small_trained_model()
    a = fresh()
    opt_a = nanor1.make_optimizer(a, 1e-2, 0.1, torch.device("cpu"), muon=True)
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(3)]
    def step(model, opt, g):
        for p, gp in zip(model.parameters(), g):
            p.grad = gp.clone()
        opt.step()
    for g in grads[:2]:
        step(a, opt_a, g)
    torch.save({"model": a.state_dict(), "optimizer": opt_a.state_dict()}, tmp_path / "c.pt")
    b = fresh()
    opt_b = nanor1.make_optimizer(b, 1e-2, 0.1, torch.device("cpu"), muon=True)
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])
    step(a, opt_a, grads[2])
    step(b, opt_b, grads[2])
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{n} differs after the restored step"
    with pytest.raises(ValueError, match="another optimizer"):
        plumbing.Optimizers(torch.optim.SGD(fresh().parameters(), lr=1)).load_state_dict(saved["optimizer"])


# -----------------------------------------------------------------------------
# What pretrain() feeds the model

def record_training_forwards(model, snapshot=False):
    """Every forward of model from now on -> calls: dicts of its tokens, doc_ids and logits (and,
    with snapshot, a fresh copy of the model as it was at that forward, without these hooks)."""
    calls = []

    def before(module, args, kwargs):
        tokens = args[0] if args else kwargs["tokens"]
        doc_ids = kwargs.get("doc_ids")
        calls.append({"tokens": tokens.detach().clone(),
                      "doc_ids": None if doc_ids is None else doc_ids.detach().clone(),
                      "state": copy.deepcopy(module.state_dict()) if snapshot else None})

    def after(module, args, kwargs, out):
        calls[-1]["logits"] = out[0].detach().clone()

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return calls


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.balance
def test_pretraining_draws_a_new_batch_every_step_and_the_same_on_a_rerun(tmp_path):
    """Every forward of pretrain() (2 steps x 2 micro-batches) sees a batch of its own, and a rerun
    with the same seed sees exactly the same batches; another seed, other batches. Guards against
    the step (or the micro-batch) missing from the data seed: the same batch at every step."""
    def fed(seed):
        (tmp_path / str(seed)).mkdir(exist_ok=True)
        cfg = tiny_config(tmp_path / str(seed), pretrain_steps=2, batch_size=4, grad_accum=2, warmup_steps=1,
                          log_every=100, seed=seed)
        torch.manual_seed(0)
        model = moe.Transformer(cfg.model)
        calls = record_training_forwards(model)
        nanor1.pretrain(cfg, model, torch.device("cpu"), 0, 1, {})
        return [c["tokens"] for c in calls]

    first, again, other = fed(7), fed(7), fed(8)
    assert len(first) == 4 and all(x.shape == (2, 128) for x in first)
    for i in range(len(first)):
        for j in range(i):
            assert not torch.equal(first[i], first[j]), f"forwards {j} and {i} were fed the same batch"
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "a rerun must see the same batches"
    assert not any(torch.equal(a, b) for a, b in zip(first, other)), "another seed, other batches"


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
@pytest.mark.balance
def test_pretraining_documents_in_a_packed_row_do_not_see_each_other(tmp_path):
    """The logits pretrain() trains on, position by position, equal those of each packed document
    run alone, from its own leading end-of-text, by the model as it was at that forward. Guards
    against pretraining without the per-document attention (doc_ids dropped from the training
    forward), where a document attends to the ones packed before it."""
    cfg = tiny_config(tmp_path, pretrain_steps=2, batch_size=4, warmup_steps=1, log_every=100)
    torch.manual_seed(0)
    model = moe.Transformer(cfg.model)
    with torch.no_grad():          # large weights: sharp attention, so a leak across documents shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    calls = record_training_forwards(model, snapshot=True)
    nanor1.pretrain(cfg, model, torch.device("cpu"), 0, 1, {})
    assert len(calls) == 2
    packed = 0
    for call in calls:
        then = moe.Transformer(cfg.model).eval()
        then.load_state_dict(call["state"])
        x, logits = call["tokens"], call["logits"]
        for r in range(x.size(0)):
            starts = (x[r] == nanor1.EOT).nonzero().squeeze(1).tolist()   # each document's leading end-of-text
            assert starts[0] == 0
            ends = starts[1:] + [x.size(1)]
            packed += sum(e - s > 1 for s, e in zip(starts, ends)) - 1     # real documents after the first
            for s, e in zip(starts, ends):
                with torch.no_grad():
                    alone = then(x[r:r + 1, s:e])[0][0]
                torch.testing.assert_close(logits[r, s:e], alone, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"row {r}, document at {s}:{e}: {m}")
    assert packed >= 4, "the rows should pack several documents each"
