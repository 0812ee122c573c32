"""tests/gpu_check.py, the script prepared for a lent GPU, checked here without one: it reads the
preset train.sh really runs, and its arithmetic (tokens/s, MFU, rollout tokens/s, the GPU's busy
share of a step) matches the formulas worked by hand. Its whole path runs on the CPU in
`python tests/gpu_check.py --smoke` (by hand: it trains, ~10 seconds)."""
import os
import re
import shlex
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preset_is_train_sh_own():
    """bash's reading of PRESET equals the array's text split by shell rules, continuation lines
    and all; and every flag of it is one nanor1.py accepts."""
    text = open(os.path.join(ROOT, "train.sh")).read()
    body = re.search(r"^PRESET=\((.*?)^\)", text, re.S | re.M).group(1)
    assert gpu_check.preset_flags() == shlex.split(body)
    cfg = gpu_check.nanor1.parse_args(gpu_check.preset_flags() + gpu_check.RUN_FLAGS)
    assert (cfg.model.dim, cfg.pretrain_steps, cfg.grpo_steps, cfg.out_dir) == \
        (384, 300, 5, "out-gpu")


def test_summarize_metrics_by_hand():
    records = [  # the first pretraining line holds start-up and is left out of the median
        {"stage": "pretrain", "step": 25, "tok_s": 100.0, "peak_mem_gb": 1.0},
        {"stage": "pretrain", "step": 50, "tok_s": 400.0, "peak_mem_gb": 2.0},
        {"stage": "pretrain", "step": 75, "tok_s": 200.0, "peak_mem_gb": 2.5},
        {"stage": "pretrain", "step": 100, "tok_s": 300.0, "peak_mem_gb": 2.5},
        {"stage": "grpo", "step": 1, "length": 10.0, "t_gen": 2.0, "t_update": 1.0,
         "peak_mem_gb": 3.0},
        {"stage": "grpo", "step": 2, "length": 30.0, "t_gen": 4.0, "t_update": 3.0,
         "peak_mem_gb": None},
        {"stage": "grpo", "step": 3, "length": 20.0, "t_gen": 1.0, "t_update": 2.0},
        {"stage": "sft", "step": 1, "tok_s": 1e9},                  # another stage: not counted
    ]
    s = gpu_check.summarize_metrics(records, sequences_per_step=64, flops_per_token=1e6, world=2,
                                    peak=1e9)
    assert s["pretrain_log_lines"] == 4 and s["grpo_steps"] == 3
    assert s["pretrain_tok_s"] == 300.0                             # median of 400, 200, 300
    assert s["pretrain_mfu"] == pytest.approx(1e6 * 300 / 2 / 1e9)  # 0.15 per GPU
    # rollout tokens/s per step: 64*10/2 = 320, 64*30/4 = 480, 64*20/1 = 1280
    assert s["rollout_tok_s"] == pytest.approx(480.0)
    assert (s["grpo_t_gen_s"], s["grpo_t_update_s"], s["grpo_mean_length"]) == (2.0, 2.0, 20.0)
    assert s["peak_mem_gb"] == 3.0
    empty = gpu_check.summarize_metrics([], 64, 1e6, 1, None)
    assert empty == {"pretrain_log_lines": 0, "grpo_steps": 0, "peak_mem_gb": None}
    one = gpu_check.summarize_metrics(records[:1], 64, 1e6, 1, None)    # no peak: no MFU
    assert one["pretrain_tok_s"] == 100.0 and one["pretrain_mfu"] is None


def _event(name, device, start, end, annotation=False):
    span = SimpleNamespace(elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, device_type=f"DeviceType.{device}", time_range=span,
                           is_user_annotation=annotation)


def test_profile_summary_by_hand():
    events = [_event("aten::mm", "CPU", 0, 900),                    # host time: not GPU busy
              _event("gemm_kernel", "CUDA", 0, 3000), _event("gemm_kernel", "CUDA", 5000, 8000),
              _event("softmax_kernel", "CUDA", 9000, 10000),
              _event("cudaStreamSynchronize", "CPU", 0, 10), _event("cudaStreamSynchronize", "CPU",
                                                                    20, 30),
              _event("cudaEventSynchronize", "CPU", 35, 38),
              _event("cudaDeviceSynchronize", "CPU", 40, 50),         # the script's own: not one
              # Optimizer.step's record_function span, shown on the GPU's timeline: not a kernel
              _event("Optimizer.step#Muon.step", "CUDA", 0, 9000, annotation=True)]
    s = gpu_check.profile_summary(events, steps=2, wall=0.01)       # two steps of 10 ms
    # kernels 3 + 3 + 1 = 7 ms over two steps: 3.5 ms busy of each 10 ms step
    assert s["gpu_busy_frac"] == pytest.approx(0.35)
    assert s["gpu_busy_ms_per_step"] == pytest.approx(3.5)
    assert s["host_syncs_per_step"] == 1.5
    assert s["profiled_step_ms"] == pytest.approx(10.0)
    assert s["top_kernels_ms_per_step"] == [("gemm_kernel", 3.0), ("softmax_kernel", 0.5)]
    cpu_only = gpu_check.profile_summary(events[:1], steps=1, wall=0.01)
    assert cpu_only["gpu_busy_frac"] is None and cpu_only["top_kernels_ms_per_step"] == []
    assert cpu_only["host_syncs_per_step"] is None                 # not measured without CUDA


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_cpu_peak_memory_matches_the_kernels_count():
    """plumbing.peak_memory_gb on a CPU against the kernel's own high-water mark (VmHWM, kB), read
    from /proc after 0.4 GB have been touched: the same quantity by a second path, in GB."""
    import torch
    block = torch.ones(100_000_000)                                # 0.4 GB, every page written
    got = gpu_check.plumbing.peak_memory_gb(torch.device("cpu"))
    status = open("/proc/self/status").read()
    hwm_gb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / 1e9
    assert got >= block.numel() * 4 / 1e9
    assert got == pytest.approx(hwm_gb, rel=0.02)


def test_pretraining_steps_fit_the_budget():
    """As many steps as fit in PRETRAIN_BUDGET_S (120 s) at the measured step, in 25s, 50-300."""
    steps = lambda ms: int(dict(zip(*[iter(gpu_check.run_flags(ms))] * 2))["--pretrain_steps"])
    assert gpu_check.PRETRAIN_BUDGET_S == 120
    assert [steps(ms) for ms in (100, 400, 450, 1000, 5000, None)] == [300, 300, 250, 100, 50, 300]
    assert gpu_check.RUN_FLAGS[gpu_check.RUN_FLAGS.index("--pretrain_steps") + 1] == "300"


def test_a_silent_command_is_stopped_at_the_timeout(tmp_path):
    """The watchdog stops a command that prints nothing; one that ignores SIGTERM is killed once
    the grace has passed; a command that ends keeps its exit code and its output is logged."""
    import time
    log = str(tmp_path / "log")
    t = time.monotonic()
    assert gpu_check.run_logged(["bash", "-c", "echo hi; sleep 60"], 1, log, grace=5) == 124
    assert time.monotonic() - t < 10 and open(log).read() == "hi\n"
    t = time.monotonic()
    stubborn = ["bash", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"]
    assert gpu_check.run_logged(stubborn, 1, log, grace=1) == 124
    assert time.monotonic() - t < 10
    assert gpu_check.run_logged(["bash", "-c", "echo done; exit 3"], 30, log) == 3
    assert open(log).read() == "done\n"
    # a worker in its own session (as torchrun starts them) left holding the pipe: no hang
    t = time.monotonic()
    assert gpu_check.run_logged(["bash", "-c", "setsid sleep 20 & exit 0"], 60, log) == 0
    assert time.monotonic() - t < 15


def test_a_cut_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "pretrain", "tok_s": 5.0}\n{"stage": "grpo", "t_ge')
    assert gpu_check.read_records(str(path)) == [{"stage": "pretrain", "tok_s": 5.0}]
    assert gpu_check.read_records(str(tmp_path / "absent.jsonl")) == []
