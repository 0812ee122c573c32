"""
The GPU check: one prepared script for the few minutes a GPU is lent, run by hand (pytest does not
collect this file). It measures train.sh's preset where it would really run, instead of the FLOP
estimates in train.sh's header and the README:

    python tests/gpu_check.py            # on a CUDA machine: ~4-6 minutes (--timeout caps train.sh)
    python tests/gpu_check.py -- --grpo_steps 3   # more nanor1.py flags for train.sh, after --
    python tests/gpu_check.py --smoke    # anywhere, on the CPU, at toy sizes: the same code path,
                                         # numbers meaningless (to check the script before a GPU)

What it does, in order, printing as it goes:
  1. environment: torch, CUDA, the GPU, the peak bf16 FLOP/s that MFU is measured against
  2. bf16: the preset model's logits and loss under bf16 autocast against fp32, the same weights
  3. the step: pretraining steps of the preset model (Muon + AdamW, as nanor1.pretrain steps them),
     timed (tokens/s, MFU), then a few under torch.profiler: how much of a step the GPU is busy,
     the host syncs per step (each MoE layer's counts.tolist(), the loss and grad-norm .item()),
     and the kernels that take the time
  4. the real command: `bash train.sh` (the preset, torchrun on every visible GPU) for up to 300
     pretraining steps (as many as fit in 2 minutes at the step time of 3.) and 5 GRPO steps
     into out-gpucheck/, stopped past --timeout; its metrics.jsonl summarised:
     pretraining tokens/s and MFU, rollout tokens/s (completion tokens / sampling time), update
     time per GRPO step, peak memory
It writes out-gpucheck/gpu_check.json after each stage, and at the end gpu_check.md (a table
for the README); into $OUT too when that is set, with train.log and the run's metrics.jsonl.
"""
import argparse
import contextlib
import gc
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
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
PRETRAIN_BUDGET_S = 120   # of train.sh's pretraining, so that its GRPO steps surely come


def run_flags(step_ms) -> list:
    """RUN_FLAGS with as many pretraining steps as fit in PRETRAIN_BUDGET_S at the step time
    measured in one process (a multiple of 25, from 50 to 300)."""
    steps = int(PRETRAIN_BUDGET_S * 1000 / step_ms) // 25 * 25 if step_ms else 300
    flags = list(RUN_FLAGS)
    flags[flags.index("--pretrain_steps") + 1] = str(max(50, min(300, steps)))
    return flags


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
        with contextlib.suppress(OSError, subprocess.SubprocessError):   # train.sh needs Default
            env["compute_mode"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
    env["peak_flops"] = plumbing.peak_flops(device)
    return env


def pretrain_loss(model, x, y):
    """nanor1.pretrain's loss (packed documents attend to themselves only): loss, aux, logits."""
    logits, aux = model(x, doc_ids=(x == EOT).cumsum(1))
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
    return loss, aux, logits.float()


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
                loss, _, logits = pretrain_loss(model, x, y)
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
    if device.type == "cuda":                    # as nanor1's setup does (after bf16_check's fp32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
            loss, aux, _ = pretrain_loss(model, x, y)
        (loss + aux).backward()
        plumbing.clipped_step(cfg, model, opt, cfg.lr, loss.item(), "gpu_check", i + 1, timed,
                              "--lr")                         # pretrain's step, syncs and all
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
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()                  # inside: not the profiler's start and stop
        for i in range(profiled):
            step(i)
        _sync(device)
        wall = (time.perf_counter() - t) / profiled
    res.update(profile_summary(prof.events(), profiled, wall))
    if res["gpu_busy_ms_per_step"] is not None:   # the profiler slows the host: against the timed
        res["gpu_busy_frac_of_timed_step"] = res["gpu_busy_ms_per_step"] / res["step_ms"]
    return res


# the host waiting on the stream: .item(), .tolist(), .cpu() end in one of these. Not counted:
# cudaDeviceSynchronize, which only this script (and the profiler, on exit) calls
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize")


def profile_summary(events, steps: int, wall: float) -> dict:
    """From profiler events of `steps` steps taking `wall` s each: the GPU's busy share of a step
    (the sum of kernel times; overlapping streams would count twice, nanor1 uses one), the host's
    sync calls per step, and the kernels that take the most time. The spans that record_function
    marks on the GPU (e.g. Optimizer.step's) are annotations, not kernels."""
    kernels, syncs = {}, 0
    for e in events:
        if str(e.device_type).endswith("CUDA"):                  # a kernel, memcpy or memset
            if not getattr(e, "is_user_annotation", False):
                kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
        elif e.name in SYNC_CALLS:
            syncs += 1
    busy = sum(kernels.values()) / 1e6 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {"profiled_step_ms": 1000 * wall,
            "gpu_busy_ms_per_step": 1000 * busy if kernels else None,
            "gpu_busy_frac": busy / wall if kernels else None,
            "host_syncs_per_step": syncs / steps if kernels else None,     # CUDA calls only
            "top_kernels_ms_per_step": [(name[:70], us / 1e3 / steps) for name, us in top]}


def run_train_sh(args, flags: list, out_dir: str, log_path: str) -> int:
    """bash train.sh with the short run's flags, through run_logged."""
    if args.smoke:
        cmd = ["bash", "train.sh", "cpu"] + SMOKE_PRESET + SMOKE_RUN + args.train_flags
    else:
        cmd = ["bash", "train.sh"] + flags
    cmd += ["--out_dir", out_dir]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    rc = run_logged(cmd, args.timeout, log_path)
    if rc == 124:
        print(f"gpu_check: train.sh stopped after {args.timeout} s", flush=True)
    return rc


def run_logged(cmd: list, timeout: float, log_path: str, grace: float = 45) -> int:
    """cmd's output to the console and log_path; its exit code, or 124 if it was stopped. Past
    timeout seconds (a timer: even if it prints nothing) its process group gets SIGTERM, which
    torchrun forwards to its workers, waiting up to 30 s for them; past grace more, SIGKILL. The
    output is read in a thread, so that workers left holding the pipe cannot hang this one."""
    # torchrun from this Python's environment, even where its bin/ is not on PATH
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env, start_new_session=True)
        lock, stopped, done, timers = threading.Lock(), threading.Event(), [False], []

        def signal_group(sig):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

        def start_timer(seconds, fn, *args):
            timers.append(threading.Timer(seconds, fn, args))
            timers[-1].daemon = True
            timers[-1].start()

        def stop():   # once, and never after the command has ended
            with lock:
                if done[0] or stopped.is_set():
                    return
                stopped.set()
                signal_group(signal.SIGTERM)
                start_timer(grace, signal_group, signal.SIGKILL)

        def read():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start_timer(timeout, stop)
        try:
            rc = proc.wait()
        except BaseException:                     # Ctrl-C, or anything else: stop it too
            stop()
            rc = proc.wait()
            raise
        finally:
            with lock:
                done[0] = True
                for t in timers:
                    t.cancel()
            reader.join(timeout=10)
        return 124 if stopped.is_set() and rc != 0 else rc


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
            ("GPU busy in a step", f"{f(st.get('gpu_busy_frac_of_timed_step'), '.0%')} of a timed "
                                   f"step (kernels {f(st.get('gpu_busy_ms_per_step'), '.0f')} ms; "
                                   f"{f(st.get('gpu_busy_frac'), '.0%')} of a profiled "
                                   f"{f(st.get('profiled_step_ms'), '.0f')} ms)"),
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


def save(res: dict, out_dir: str, final: bool = False) -> str:
    """gpu_check.json (and, at the end, gpu_check.md, train.log and the run's metrics.jsonl) into
    out_dir and $OUT, after every stage: a lent GPU's time is short, a later stage may not end."""
    md = markdown(res) if final else ""
    for d in filter(None, (out_dir, os.environ.get("OUT"))):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "gpu_check.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        if final:
            with open(os.path.join(d, "gpu_check.md"), "w") as fh:
                fh.write(md)
            for src in ("train.log", os.path.join("run", "metrics.jsonl")):
                path = os.path.join(out_dir, src)
                if os.path.exists(path) and not os.path.samefile(d, out_dir):
                    shutil.copy(path, os.path.join(d, os.path.basename(src)))
    return md


def read_records(path: str) -> list:
    """metrics.jsonl's records; a last line cut short by a stopped run is skipped."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path) as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the script itself")
    ap.add_argument("--timeout", type=int, default=270, help="seconds train.sh may run")
    ap.add_argument("--budget", type=int, default=450,
                    help="seconds for the whole script: train.sh's timeout shrinks to fit it")
    ap.add_argument("--out_dir", default="out-gpucheck")
    ap.add_argument("train_flags", nargs="*", help="more nanor1.py flags for train.sh's run")
    args = ap.parse_args(argv)
    t0 = time.time()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible to torch (--smoke runs it on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda:0")
    flags = SMOKE_PRESET if args.smoke else preset_flags()
    cfg = nanor1.parse_args(flags + ["--device", device.type])
    run_cfg = nanor1.parse_args((flags + SMOKE_RUN if args.smoke else flags + RUN_FLAGS)
                                + args.train_flags)   # a bad extra flag: one line, before the GPU
    out_dir = os.path.join(ROOT, args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    res = {"environment": environment(device)}
    print("environment:", json.dumps(res["environment"]), flush=True)
    res["bf16"] = bf16_check(cfg, device)
    print("bf16 vs fp32:", json.dumps(res["bf16"]), flush=True)
    save(res, out_dir)
    res["step"] = step_profile(cfg, device, timed=4 if args.smoke else 20, profiled=3)
    print("step:", json.dumps(res["step"]), flush=True)
    save(res, out_dir)
    if device.type == "cuda":                  # leave train.sh's ranks the memory this one held
        gc.collect()
        torch.cuda.empty_cache()
    run_dir = os.path.join(out_dir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.time()
    train_flags = run_flags(res["step"]["step_ms"]) + args.train_flags
    args.timeout = max(30, min(args.timeout, args.budget - (t - t0) - 60))   # 45 s grace + rest
    rc = run_train_sh(args, train_flags, run_dir, os.path.join(out_dir, "train.log"))
    save(res, out_dir, final=True)             # train.log and metrics.jsonl out, whatever follows
    records = read_records(os.path.join(run_dir, "metrics.jsonl"))
    world = 1 if args.smoke else torch.cuda.device_count()
    res["run"] = summarize_metrics(records, run_cfg.prompts_per_step * run_cfg.group_size,
                                   res["step"]["flops_per_token"], world,
                                   res["environment"]["peak_flops"])
    res["run"].update(rc=rc, wall_s=time.time() - t, world=world)
    print("train.sh:", json.dumps(res["run"]), flush=True)
    print(save(res, out_dir, final=True))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
