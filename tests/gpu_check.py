"""
The GPU check: one prepared script for the few minutes a GPU is lent, run by hand (pytest does not
collect this file). It measures train.sh's preset where it would really run, instead of the FLOP
estimates in train.sh's header and the README:

    python tests/gpu_check.py            # on a CUDA machine: ~4-6 minutes (--timeout caps train.sh)
    python tests/gpu_check.py --smoke    # anywhere, on the CPU, at toy sizes: the same code path,
                                         # numbers meaningless (to check the script before a GPU)

What it does, in order, printing as it goes:
  1. environment: torch, CUDA, the GPU, the peak bf16 FLOP/s that MFU is measured against
  2. bf16: the preset model's logits and loss under bf16 autocast against fp32, the same weights
  3. the step: pretraining steps of the preset model (Muon + AdamW, as nanor1.pretrain steps them),
     timed (tokens/s, MFU), then a few under torch.profiler: how much of a step the GPU is busy,
     the host syncs per step (each MoE layer's counts.tolist(), the loss and grad-norm .item()),
     and the kernels that take the time
  4. the real command: `bash train.sh` (the preset, torchrun on every visible GPU) for
     --pretrain_steps 300 and --grpo_steps 5 into out-gpucheck/, its metrics.jsonl summarised:
     pretraining tokens/s and MFU, rollout tokens/s (completion tokens / sampling time), update
     time per GRPO step, peak memory
It writes out-gpucheck/gpu_check.json and gpu_check.md (a table for the README), and copies both
into $OUT when that is set.
"""
import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nanor1  # noqa: E402
import plumbing  # noqa: E402
from moe import Transformer  # noqa: E402
from nanor1 import EOT, make_optimizer, pretrain_batches  # noqa: E402

# the short real run: enough pretraining steps for several log lines past the first (which holds
# start-up), a few GRPO steps, small evaluations; everything else is train.sh's preset
RUN_FLAGS = ["--pretrain_steps", "300", "--log_every", "25", "--eval_every", "0",
             "--ckpt_every", "0", "--grpo_steps", "5", "--grpo_eval_every", "0",
             "--grpo_ckpt_every", "0", "--n_test", "100"]
# --smoke: the CPU default shrunk, through `bash train.sh cpu` (the same script, the CPU branch)
SMOKE_PRESET = ["--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "32", "--n_layers", "2",
                "--kv_lora_rank", "16", "--batch_size", "8", "--block_size", "128",
                "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "32",
                "--eval_batch", "64"]
SMOKE_RUN = ["--pretrain_steps", "6", "--log_every", "2", "--eval_every", "0", "--ckpt_every", "0",
             "--grpo_steps", "2", "--grpo_eval_every", "0", "--grpo_ckpt_every", "0",
             "--n_test", "4"]


def preset_flags() -> list:
    """train.sh's PRESET array, read by bash itself (one source of truth for the preset)."""
    script = f"source <(sed -n '/^PRESET=(/,/^)/p' {shlex.quote(os.path.join(ROOT, 'train.sh'))})" \
             "; printf '%s\\n' \"${PRESET[@]}\""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    flags = out.split()
    if "--dim" not in flags:
        raise SystemExit("gpu_check: could not read PRESET from train.sh")
    return flags


def environment(device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1),
                   gpus_visible=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    env["peak_flops"] = plumbing.peak_flops(device)
    return env


def bf16_check(cfg, device) -> dict:
    """The same weights and tokens through fp32 and bf16 autocast: how far the logits move."""
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).eval()
    x, y = next(pretrain_batches(cfg, random.Random("gpu-check"), 8))
    x, y = x.to(device), y.to(device)
    out = {}
    with torch.no_grad():
        for name, ctx in (("fp32", contextlib.nullcontext()),
                          ("bf16", torch.autocast(device.type, dtype=torch.bfloat16))):
            with ctx:
                logits, _ = model(x, doc_ids=(x == EOT).cumsum(1))
            logits = logits.float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
            out[name] = (logits, loss.item())
    diff = (out["bf16"][0] - out["fp32"][0]).abs()
    return {"logits_max_abs_diff": diff.max().item(),
            "logits_diff_over_std": (diff.mean() / out["fp32"][0].std()).item(),
            "loss_fp32": out["fp32"][1], "loss_bf16": out["bf16"][1]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_profile(cfg, device, timed: int, profiled: int) -> dict:
    """Pretraining steps of the model in cfg, stepped as nanor1.pretrain steps them (bf16 autocast
    on CUDA, Muon + AdamW, clipping, the router-bias update): timed ones, then profiled ones."""
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    mult = dict.fromkeys(("embed.weight", "head.weight"), cfg.embed_lr_mult)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, device, True, mult, cfg.muon_momentum)
    rng = random.Random("gpu-check-steps")
    batches = [tuple(t.to(device) for t in next(pretrain_batches(cfg, rng, cfg.batch_size)))
               for _ in range(4)]

    def step(i):
        x, y = batches[i % len(batches)]
        with plumbing.autocast(cfg, device):
            logits, aux = model(x, doc_ids=(x == EOT).cumsum(1))
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1),
                                   ignore_index=-1)
        (loss + aux).backward()
        loss.item()                                                   # as pretrain logs it
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()

    for i in range(3):                                                # warm-up
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(timed):
        t = time.perf_counter()
        step(i)
        _sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tokens = cfg.batch_size * cfg.block_size
    flops = model.flops_per_token(cfg.block_size)
    peak = plumbing.peak_flops(device)
    res = {"params": sum(p.numel() for p in model.parameters()), "tokens_per_step": tokens,
           "step_ms": 1000 * dt, "tok_s": tokens / dt, "flops_per_token": flops,
           "mfu": flops * tokens / dt / peak if peak else None,
           "peak_mem_gb": plumbing.peak_memory_gb(device)}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    t = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(profiled):
            step(i)
        _sync(device)
    wall = (time.perf_counter() - t) / profiled
    res.update(profile_summary(prof.events(), profiled, wall))
    return res


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_summary(events, steps: int, wall: float) -> dict:
    """From profiler events of `steps` steps taking `wall` s each: the GPU's busy share of a step
    (the sum of kernel times; overlapping streams would count twice, nanor1 uses one), the host's
    sync calls per step, and the kernels that take the most time."""
    kernels, syncs = {}, 0
    for e in events:
        if str(e.device_type).endswith("CUDA"):                  # a kernel, memcpy or memset
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
        elif e.name in SYNC_CALLS:
            syncs += 1
    busy = sum(kernels.values()) / 1e6 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {"profiled_step_ms": 1000 * wall,
            "gpu_busy_frac": busy / wall if kernels else None,
            "host_syncs_per_step": syncs / steps if kernels else None,     # CUDA calls only
            "top_kernels_ms_per_step": [(name[:70], us / 1e3 / steps) for name, us in top]}


def run_train_sh(args, out_dir: str, log_path: str) -> int:
    """bash train.sh with the short run's flags; its output to the console and log_path. Past
    args.timeout seconds the whole process group is stopped (and what it logged is still read)."""
    if args.smoke:
        cmd = ["bash", "train.sh", "cpu"] + SMOKE_PRESET + SMOKE_RUN
    else:
        cmd = ["bash", "train.sh"] + RUN_FLAGS
    cmd += ["--out_dir", out_dir] + args.train_flags
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        deadline = time.time() + args.timeout
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                if time.time() > deadline:
                    raise TimeoutError
            return proc.wait()
        except (TimeoutError, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            print(f"gpu_check: train.sh stopped after {args.timeout} s", flush=True)
            return 124


def summarize_metrics(records: list, sequences_per_step: int, flops_per_token: float,
                      world: int, peak) -> dict:
    """metrics.jsonl's records -> the run's speeds: pretraining tokens/s (median of the log lines
    after the first, which holds start-up) and MFU per GPU; GRPO's sampling (rollout tokens/s:
    sequences_per_step completions of the step's mean length over its sampling time) and update
    times, medians over its steps; the largest peak memory any record saw."""
    pre = [r for r in records if r.get("stage") == "pretrain" and "tok_s" in r]
    rl = [r for r in records if r.get("stage") == "grpo" and "t_gen" in r]
    out = {"pretrain_log_lines": len(pre), "grpo_steps": len(rl)}
    steady = pre[1:] or pre
    if steady:
        tok_s = statistics.median(r["tok_s"] for r in steady)
        out["pretrain_tok_s"] = tok_s
        out["pretrain_mfu"] = flops_per_token * tok_s / world / peak if peak else None
    if rl:
        out["rollout_tok_s"] = statistics.median(sequences_per_step * r["length"] / r["t_gen"]
                                                 for r in rl)
        out["grpo_t_gen_s"] = statistics.median(r["t_gen"] for r in rl)
        out["grpo_t_update_s"] = statistics.median(r["t_update"] for r in rl)
        out["grpo_mean_length"] = statistics.median(r["length"] for r in rl)
    mems = [r["peak_mem_gb"] for r in pre + rl if r.get("peak_mem_gb") is not None]
    out["peak_mem_gb"] = max(mems) if mems else None
    return out


def markdown(res: dict) -> str:
    """The numbers as a short table, for the README's GPU section."""
    env, st, run = res["environment"], res.get("step", {}), res.get("run", {})

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    rows = [("machine", f"{env.get('gpu', env['device'])}, torch {env['torch']}, "
                        f"CUDA {env['cuda']}"),
            ("bf16 vs fp32 logits", f"max abs diff {f(res['bf16']['logits_max_abs_diff'], '.3g')}"
                                    f", loss {res['bf16']['loss_fp32']:.4f} vs "
                                    f"{res['bf16']['loss_bf16']:.4f}"),
            ("pretraining step (preset, one process)", f"{f(st.get('step_ms'), '.0f')} ms, "
             f"{f(st.get('tok_s'), ',.0f')} tok/s, MFU {f(st.get('mfu'), '.1%')}"),
            ("GPU busy in a step", f(st.get("gpu_busy_frac"), ".0%")),
            ("host syncs per step", f(st.get("host_syncs_per_step"), ".0f")),
            ("train.sh: pretraining", f"{f(run.get('pretrain_tok_s'), ',.0f')} tok/s, "
                                      f"MFU {f(run.get('pretrain_mfu'), '.1%')}"),
            ("train.sh: rollouts", f"{f(run.get('rollout_tok_s'), ',.0f')} completion tok/s "
                                   f"({f(run.get('grpo_t_gen_s'), '.1f')} s a step)"),
            ("train.sh: GRPO update", f"{f(run.get('grpo_t_update_s'), '.1f')} s a step"),
            ("peak memory", f"{f(run.get('peak_mem_gb'), '.1f')} GB"),
            ("train.sh wall time", f"{f(run.get('wall_s'), '.0f')} s (exit {run.get('rc')})")]
    lines = ["| measured | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    kernels = st.get("top_kernels_ms_per_step") or []
    if kernels:
        lines += ["", "| kernel (profiled steps) | ms a step |", "| --- | --- |"]
        lines += [f"| `{name}` | {ms:.2f} |" for name, ms in kernels]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the script itself")
    ap.add_argument("--timeout", type=int, default=360, help="seconds train.sh may run")
    ap.add_argument("--out_dir", default="out-gpucheck")
    ap.add_argument("train_flags", nargs="*", help="more nanor1.py flags for train.sh's run")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible to torch (--smoke runs it on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda:0")
    flags = SMOKE_PRESET if args.smoke else preset_flags()
    cfg = nanor1.parse_args(flags + ["--device", device.type])
    out_dir = os.path.join(ROOT, args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    res = {"environment": environment(device)}
    print("environment:", json.dumps(res["environment"]), flush=True)
    res["bf16"] = bf16_check(cfg, device)
    print("bf16 vs fp32:", json.dumps(res["bf16"]), flush=True)
    res["step"] = step_profile(cfg, device, timed=4 if args.smoke else 20, profiled=3)
    print("step:", json.dumps(res["step"]), flush=True)
    if device.type == "cuda":                  # leave train.sh's ranks the memory this one held
        torch.cuda.empty_cache()
    run_dir = os.path.join(out_dir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.time()
    rc = run_train_sh(args, run_dir, os.path.join(out_dir, "train.log"))
    records = []
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    run_cfg = cfg if args.smoke else nanor1.parse_args(flags + RUN_FLAGS + args.train_flags)
    world = 1 if args.smoke else torch.cuda.device_count()
    res["run"] = summarize_metrics(records, run_cfg.prompts_per_step * run_cfg.group_size,
                                   res["step"]["flops_per_token"], world,
                                   res["environment"]["peak_flops"])
    res["run"].update(rc=rc, wall_s=time.time() - t, world=world)
    print("train.sh:", json.dumps(res["run"]), flush=True)
    md = markdown(res)
    print(md)
    for d in filter(None, (out_dir, os.environ.get("OUT"))):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "gpu_check.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        with open(os.path.join(d, "gpu_check.md"), "w") as fh:
            fh.write(md)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
