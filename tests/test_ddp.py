"""Scale-out: DistributedDataParallel over gloo, 2 CPU processes, against one process doing the same work.

Each 2-process job (a module fixture; spawned processes, killed on a timeout so a hang fails instead
of blocking the suite) runs scenarios and saves what each rank ends with; the same scenarios then run
in this process with world size 1:
  * pretraining: 2 ranks x 1 micro-step equal 1 rank x 2 micro-steps (same global batch, same data);
  * an expert that gets no tokens on one rank (for the whole step, or only in the micro-step that
    syncs): no hang, and still the one-process result;
  * GRPO on fixed rollouts: the same loss and gradients as one process, also when every group of one
    rank is dropped (drop_zero_std);
  * parameters and router biases identical on both ranks.
The whole pipeline under `torchrun --nproc_per_node=2` is the slow test at the end.
"""
import json
import os
import random
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

import data
import moe
import nanor1
import plumbing
from marks import ALL, GRPO, MODEL, needs
from nanor1 import enc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
TIMEOUT = 180   # seconds for a 2-process job; a DDP hang shows up as this timeout


def tiny_config(out_dir, **kw):
    model = moe.ModelConfig(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_heads=2, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                            n_activated_experts=2, vocab_size=enc.n_vocab)
    # AdamW: these tests compare 2 ranks' mean gradient with 1 process's, equal to the last bits;
    # Muon's Newton-Schulz runs in bf16, where such bits round apart (3e-5 to 3e-4 after 3 steps),
    # which would hide a real error at the 1e-5 these tests hold the weights to
    base = dict(out_dir=str(out_dir), device="cpu", threads=1, block_size=128, warmup_steps=2, lr=1e-2,
                log_every=2, eval_every=0, model=model, optimizer="adamw")
    base.update(kw)
    return nanor1.Config(**base)


def tiny_model():
    torch.manual_seed(0)
    return moe.Transformer(tiny_config(".").model)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}   # parameters and router biases


# -----------------------------------------------------------------------------
# Running a function on 2 processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, scenarios):
    """One rank: join the gloo group through nanor1.setup (as under torchrun), run, save."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        nanor1.setup(tiny_config(out))
        results = {name: fn(os.path.join(out, f"{name}-rank{rank}"), rank, world, *args)
                   for name, fn, args in scenarios}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_two_ranks(out, scenarios):
    """-> [results of rank 0, results of rank 1], or an error string (a traceback, or a hang)."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(out), scenarios)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + TIMEOUT
    while any(p.is_alive() for p in procs) and time.time() < deadline and \
            not any(p.exitcode not in (None, 0) for p in procs):   # one rank failed: the other would wait
        time.sleep(0.1)
    hung = any(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    errs = [open(e).read() for r in range(2) if os.path.exists(e := os.path.join(out, f"rank{r}.err"))]
    if errs:
        return "\n".join(errs)
    if hung:
        return f"hung for {TIMEOUT}s (a DDP collective that a rank never joined?)"
    if any(p.exitcode for p in procs):
        return f"exit codes {[p.exitcode for p in procs]}"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def ranks_or_fail(job):
    if isinstance(job, str):
        pytest.fail(f"the 2-process job failed:\n{job[-4000:]}", pytrace=False)
    return job


def assert_close_states(a, b, atol=1e-5, what=""):
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f"{what}{k}: differs by {diff:.2e}"


# -----------------------------------------------------------------------------
# Pretraining scenarios (each runs with world 2 in the spawned ranks and with world 1 here)

def pretrain_real_data(out_dir, rank, world):
    """A few steps on the real data; grad_accum=2 is 2 micro-steps in one process, 1 per rank in two."""
    nanor1.peak_flops = lambda device: 1e12   # MFU is not under test; skip the CPU measurement
    cfg = tiny_config(out_dir, pretrain_steps=4, batch_size=8, grad_accum=2)
    model = tiny_model()
    os.makedirs(out_dir, exist_ok=True)
    nanor1.pretrain(cfg, model, CPU, rank, world, {})
    return snapshot(model)


def route(model, token):
    """The experts a row made of one repeated token is routed to (every position routes alike: the
    tokens are equal and attention mixes identical values)."""
    gate = model.gates()[0]
    chosen = []
    handle = gate.register_forward_hook(lambda m, i, out: chosen.append(set(out[1].flatten().tolist())))
    model.eval()
    with torch.no_grad():
        model(torch.full((1, 16), token))
    model.train()
    handle.remove()
    return chosen[0]


def idle_expert_tokens():
    """Tokens for the 4 micro-batches of a step (2 per rank): an expert that rank 0 uses but rank 1
    never does, and one that rank 0 uses in its first micro-step (under no_sync) but not in the
    last (the one that syncs)."""
    model = tiny_model()
    routes = {t: route(model, t) for t in encode_digits()}
    for a in routes:
        for b in routes:
            for c in routes:
                if routes[a] - routes[b] and (routes[a] | routes[b]) - routes[c]:
                    return [a, b, c, c], [routes[t] for t in (a, b, c, c)]
    raise AssertionError(f"no such tokens: {routes}")


def encode_digits():
    return [enc.encode_single_token(str(d)) for d in range(10)] + [enc.encode_single_token(c) for c in "+-*="]


def pretrain_idle_expert(out_dir, rank, world, slot_tokens):
    """Micro-batch i of every step is one row of slot_tokens[i] repeated: the data choose which
    experts are idle on which rank."""
    nanor1.peak_flops = lambda device: 1e12
    cfg = tiny_config(out_dir, pretrain_steps=3, batch_size=4, grad_accum=4, block_size=16)
    accum, calls = nanor1.accum_steps(cfg, world), iter(range(10 ** 6))

    def constant_rows(cfg, rng, rows):   # pretrain asks for its micro-batches in order, micro-step 0 first
        t = slot_tokens[rank * accum + next(calls) % accum]
        while True:
            yield torch.full((rows, cfg.block_size), t), torch.full((rows, cfg.block_size), t)
    nanor1.pretrain_batches = constant_rows
    model = tiny_model()
    os.makedirs(out_dir, exist_ok=True)
    nanor1.pretrain(cfg, model, CPU, rank, world, {})
    return snapshot(model)


@pytest.fixture(scope="module")
def pretrain_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-pretrain")
    slot_tokens, routes = idle_expert_tokens()
    job = run_two_ranks(out, [("real", pretrain_real_data, ()), ("idle", pretrain_idle_expert, (slot_tokens,))])
    saved = nanor1.peak_flops, nanor1.pretrain_batches
    try:
        single = {"real": pretrain_real_data(out / "real-single", 0, 1),
                  "idle": pretrain_idle_expert(out / "idle-single", 0, 1, slot_tokens)}
    finally:
        nanor1.peak_flops, nanor1.pretrain_batches = saved
    return job, single, routes


@pytest.mark.parametrize("scenario", ["real", "idle"])
@needs(*MODEL)
def test_two_ranks_pretrain_like_one_process_with_the_same_global_batch(pretrain_job, scenario):
    job, single, routes = pretrain_job
    ranks = ranks_or_fail(job)
    if scenario == "idle":   # the case is there: experts idle on rank 1, and in rank 0's syncing micro-step
        assert (routes[0] | routes[1]) - routes[2] and routes[0] - routes[1], routes
    assert_close_states(ranks[0][scenario], single[scenario], what="2 ranks vs 1 process: ")
    biases = [k for k in single[scenario] if k.endswith("gate.bias")]
    assert biases and any(single[scenario][k].abs().max() > 0 for k in biases), "router biases never moved"


@needs(*MODEL)
def test_parameters_and_router_biases_are_identical_on_every_rank(pretrain_job):
    ranks = ranks_or_fail(pretrain_job[0])
    for scenario in ranks[0]:
        for k, v in ranks[0][scenario].items():
            assert torch.equal(v, ranks[1][scenario][k]), f"{scenario}: {k} differs between the ranks"


# -----------------------------------------------------------------------------
# GRPO on fixed rollouts

G, PROMPTS = 4, 4   # global prompts per step: 2 per rank in the 2-process run


def fixed_problems(n):
    """Problems whose prompts all have the same length (so no batch is padded differently)."""
    rng = random.Random(0)
    out = []
    while len(out) < n:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        out.append(data.Problem("add2", f"{a}+{b}", a + b, ""))
    return out


def fixed_generate(model, prompts, max_new_tokens, *args, **kw):
    """Stands in for sampling: completion k of a prompt is fixed, all completions are equally long,
    and the number of 7s (the toy reward) varies within each group."""
    seen, rows = {}, []
    for p in prompts:
        k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1          # k-th completion of this prompt
        sevens = k % 3
        rows.append(nanor1.encode(f"<think>{'7' * sevens}{'1' * (3 - sevens)}</think><answer>{k}</answer>")
                    + [nanor1.EOT])
    out = torch.tensor(rows)
    return out, torch.ones_like(out, dtype=torch.bool), torch.zeros(len(rows), dtype=torch.bool)


def grpo_fixed_rollouts(out_dir, rank, world, **overrides):
    """2 GRPO steps with the same rollouts however the groups are spread over ranks. Step 1: the
    groups of prompts 2 and 3 (all of rank 1's in the 2-process run) have equal rewards and, with
    drop_zero_std, are dropped. SGD, so that the parameters move by exactly lr x gradient."""
    problems = fixed_problems(2 * PROMPTS)
    flat = {p.text for p in problems[2:4]}
    n = PROMPTS // world

    # rank r owns prompts r*n ... of each step's global list; one stream, however often grpo asks
    mine = iter([p for step in range(2) for p in problems[step * PROMPTS + rank * n: step * PROMPTS + (rank + 1) * n]])

    def my_problems(rng, levels=None):
        return mine

    def sevens(text, p):
        return 1.0 if p.text in flat else sum(c == "7" for c in text) / len(text)

    cfg = tiny_config(out_dir, grpo_steps=2, prompts_per_step=PROMPTS, group_size=G, max_new_tokens=16,
                      grpo_lr=0.5, grad_clip=1e6, beta=0.02, drop_zero_std=True, grpo_eval_every=0,
                      grpo_eval_n=1, **overrides)
    saved = nanor1.training_problems, nanor1.generate, nanor1.make_optimizer
    nanor1.training_problems, nanor1.generate = my_problems, fixed_generate
    nanor1.make_optimizer = lambda model, lr, wd, device, **multipliers: torch.optim.SGD(model.parameters(), lr=lr)
    try:
        model = tiny_model()
        ref = tiny_model()
        os.makedirs(out_dir, exist_ok=True)
        history = []
        nanor1.grpo(cfg, model, ref, CPU, rank, world, data.test_set(1), history, reward_fn=sevens)
    finally:
        nanor1.training_problems, nanor1.generate, nanor1.make_optimizer = saved
    return {"state": snapshot(model), "history": history}


GRPO_SCENARIOS = {"seq-mu2": dict(agg="seq", mu=2), "token": dict(agg="token"), "constant": dict(agg="constant")}


def _grpo(out_dir, rank, world, name):
    return grpo_fixed_rollouts(out_dir, rank, world, **GRPO_SCENARIOS[name])


@pytest.fixture(scope="module")
def grpo_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-grpo")
    job = run_two_ranks(out, [(name, _grpo, (name,)) for name in GRPO_SCENARIOS])
    single = {name: _grpo(out / f"{name}-single", 0, 1, name) for name in GRPO_SCENARIOS}
    return job, single


@pytest.mark.parametrize("scenario", list(GRPO_SCENARIOS))
@needs(*GRPO)
def test_grpo_on_two_ranks_gives_the_same_loss_and_gradients_as_one_process(grpo_job, scenario):
    job, single = grpo_job
    ranks = ranks_or_fail(job)
    one, two = single[scenario], ranks[0][scenario]
    # step 1 dropped every group of rank 1: it joined the backward with a zero-weight row, no hang
    assert [h["zero_std"] for h in one["history"]] == [0.5, 0.0]
    for h1, h2 in zip(one["history"], two["history"]):
        for key in ("reward", "acc", "fmt", "length", "zero_std", "loss", "kl", "clip_frac", "entropy"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-6), (key, h1[key], h2[key])
    assert one["history"][0]["loss"] != 0 and one["history"][1]["kl"] > 0
    assert_close_states(two["state"], one["state"], what="2 ranks vs 1 process: ")   # SGD: equal gradients
    for k, v in two["state"].items():
        assert torch.equal(v, ranks[1][scenario]["state"][k]), f"{k} differs between the ranks"


# -----------------------------------------------------------------------------
# Configuration: the global batch must split over the ranks

def test_a_batch_the_world_size_does_not_divide_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    for argv in (["--batch_size", "32"], ["--prompts_per_step", "16", "--batch_size", "24"]):
        with pytest.raises(SystemExit) as e:
            nanor1.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert argv[1] in err and "3" in err, err
    cfg = nanor1.parse_args(["--batch_size", "24", "--prompts_per_step", "12", "--grad_accum", "4"])
    assert nanor1.accum_steps(cfg, 3) == 2   # grad_accum shared among ranks, rounded up: 3 x 2 x 4 rows
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert nanor1.accum_steps(nanor1.parse_args(["--grad_accum", "4"]), 1) == 4


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None), ("Some Future GPU", None)])
def test_gpu_peak_flops_come_from_the_table_and_unknown_gpus_get_none(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert nanor1.peak_flops(torch.device("cuda", 0)) == peak


# -----------------------------------------------------------------------------
# train.sh: its GPU preset is valid nanor1 flags, launched with torchrun on NPROC processes

def test_train_sh_launches_torchrun_with_a_preset_nanor1_accepts(tmp_path, monkeypatch):
    fake = tmp_path / "torchrun"   # records its arguments instead of launching anything
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", os.path.join(ROOT, "train.sh"), "--grpo_steps", "7"], env={**env, "NPROC": "8"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["--standalone", "--nproc_per_node=8", "nanor1.py"], args
    monkeypatch.setenv("WORLD_SIZE", "8")    # as torchrun would: the batches must split over 8 ranks
    cfg = nanor1.parse_args(args[3:])
    assert cfg.grpo_steps == 7, "extra flags come last and override the preset"
    assert cfg.model.dim >= 256 and cfg.model.n_layers > tiny_config(".").model.n_layers
    r = subprocess.run(["bash", os.path.join(ROOT, "train.sh"), "cpu", "--help"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--pretrain_steps" in r.stdout, r.stderr


def train_sh_launch(tmp_path, **env) -> tuple:
    """Run train.sh with env set and a stand-in torchrun that records its arguments ->
    (exit code, stderr, the arguments)."""
    fake = tmp_path / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    fake.chmod(0o755)
    path = f"{tmp_path}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    clean = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")}
    (tmp_path / "args").unlink(missing_ok=True)
    r = subprocess.run(["bash", os.path.join(ROOT, "train.sh")], env={**clean, "PATH": path, **env},
                       capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines() if (tmp_path / "args").exists() else []
    return r.returncode, r.stderr, args


def test_train_sh_across_machines_passes_the_nodes_to_torchrun_and_alone_stays_standalone(tmp_path):
    nodes = dict(NNODES="2", MASTER_ADDR="10.1.2.3", MASTER_PORT="1234", NPROC="4")
    for rank in (0, 1):
        code, err, args = train_sh_launch(tmp_path, NODE_RANK=str(rank), **nodes)
        assert code == 0, err
        assert args[:7] == ["--nnodes=2", f"--node_rank={rank}", "--rdzv-backend=c10d",
                            "--rdzv-endpoint=10.1.2.3:1234", f"--rdzv-conf=is_host={int(rank == 0)}",
                            "--nproc_per_node=4", "nanor1.py"], args
    code, err, args = train_sh_launch(tmp_path, NPROC="4", MASTER_PORT="1234")   # no NNODES
    assert code == 0 and args[:3] == ["--standalone", "--nproc_per_node=4", "nanor1.py"], args
    code, _, nodes_args = train_sh_launch(tmp_path, NPROC="4", NNODES="2", MASTER_ADDR="10.1.2.3")
    assert code == 0 and "--rdzv-endpoint=10.1.2.3:29500" in nodes_args    # the default port
    assert args[3:] == nodes_args[nodes_args.index("nanor1.py") + 1:], "the same preset"
    for env, says in ((dict(NNODES="2", NODE_RANK="2", MASTER_ADDR="h"), "0 <= NODE_RANK < NNODES"),
                      (dict(NNODES="0"), "0 <= NODE_RANK < NNODES"),
                      (dict(NNODES="two", MASTER_ADDR="h"), "0 <= NODE_RANK < NNODES"),
                      (dict(NNODES="2", NODE_RANK="1"), "needs MASTER_ADDR")):
        code, err, args = train_sh_launch(tmp_path, NPROC="4", **env)
        assert code == 2 and not args and err.count("\n") == 1 and says in err, (env, err)


def test_the_resume_hint_of_a_run_across_machines_is_no_single_machine_launch(monkeypatch):
    monkeypatch.setattr(plumbing, "_RUN", {"argv": ["--dim", "384", "--resume"]})
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert plumbing.resume_command().startswith("torchrun --standalone --nproc_per_node=8 ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                  # 2 nodes x 4 processes
    hint = plumbing.resume_command()
    assert "--standalone" not in hint and "2 nodes" in hint and hint.endswith("--dim 384 --resume")


# -----------------------------------------------------------------------------
# Two machines, played by two torchrun launches on this one (127.0.0.1), one CPU process each

NODE_FLAGS = ["--stage", "pretrain", "--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "32",
              "--n_layers", "2", "--n_heads", "2", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
              "--qk_rope_head_dim", "8", "--v_head_dim", "8", "--n_routed_experts", "4",
              "--n_activated_experts", "2", "--pretrain_steps", "4", "--optimizer", "adamw",
              "--batch_size", "8", "--grad_accum", "2", "--log_every", "2", "--eval_every", "0",
              "--n_test", "1", "--max_new_tokens", "8", "--device", "cpu", "--threads", "1"]


@needs(*MODEL, "mla_absorb", "rewards")   # pretraining, then main's evaluations of the base
def test_two_nodes_launched_by_train_sh_end_with_the_weights_of_one_process(tmp_path):
    """train.sh's launch flags for node 0 and node 1 (recorded by a stand-in torchrun), run by
    the real torchrun, nanor1.py and a tiny pretraining instead of the GPU preset: the two nodes
    (2 ranks x 1 micro-step) must end with the weights of 1 process x 2 micro-steps."""
    port = free_port()
    launch = []
    for node in (0, 1):
        code, err, args = train_sh_launch(tmp_path, NNODES="2", NODE_RANK=str(node), NPROC="1",
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        assert code == 0, err
        launch.append(args[:args.index("nanor1.py")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"node{n}.log", "w+") for n in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch[n],
                               os.path.join(ROOT, "nanor1.py"), "--out_dir", str(tmp_path / "two"),
                               *NODE_FLAGS], cwd=ROOT, env=env, stdout=logs[n],
                              stderr=subprocess.STDOUT) for n in (0, 1)]
    deadline = time.time() + TIMEOUT
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in out)
    # one group of 2 ranks: exactly one node holds rank 0 and prints, and it says world 2
    heads = [[line for line in o.splitlines() if line.startswith("nanor1 | ")] for o in out]
    assert sorted(len(h) for h in heads) == [0, 1] and "| world 2 |" in sum(heads, [])[0], heads
    one = tmp_path / "one"
    nanor1.main(["--out_dir", str(one), *NODE_FLAGS])
    two = torch.load(tmp_path / "two" / "base.pt", weights_only=True)["model"]
    single = torch.load(one / "base.pt", weights_only=True)["model"]
    assert_close_states(two, single, what="2 nodes vs 1 process: ")
    assert any(v.abs().max() > 0 for k, v in single.items() if k.endswith("gate.bias"))


# -----------------------------------------------------------------------------
# The whole pipeline under torchrun

TINY_FLAGS = ["--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "32", "--n_layers", "2", "--n_heads", "2",
              "--kv_lora_rank", "16", "--qk_nope_head_dim", "8", "--qk_rope_head_dim", "8", "--v_head_dim", "8",
              "--n_routed_experts", "4", "--n_activated_experts", "2", "--pretrain_steps", "6", "--batch_size", "4",
              "--log_every", "3", "--eval_every", "0", "--grpo_steps", "2", "--prompts_per_step", "2",
              "--group_size", "2", "--max_new_tokens", "12", "--n_test", "2", "--grpo_eval_n", "2",
              "--grpo_eval_every", "1", "--device", "cpu", "--threads", "1"]


@pytest.mark.slow
@needs(*ALL)
def test_the_pipeline_under_torchrun_writes_its_outputs_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "nanor1.py"), "--out_dir", str(tmp_path), *TINY_FLAGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("nanor1 | ") for line in lines) == 1, r.stdout
    assert "world 2" in next(line for line in lines if line.startswith("nanor1 | "))
    for prefix in ("pretrain 00003/", "pretrain 00006/", "grpo 001/", "grpo 002/", "held-out (greedy, 2/level) after"):
        assert sum(line.startswith(prefix) for line in lines) == 1, (prefix, r.stdout)
    for prefix, n in (("pretrain ", 2), ("grpo ", 2), ("  held-out (greedy, 2/level):", 1), ("held-out (", 5)):
        assert sum(line.startswith(prefix) for line in lines) == n, (prefix, r.stdout)
    files = set(os.listdir(tmp_path))
    outputs = {"base.pt", "final.pt", "metrics.jsonl", "nanor1.png", "samples.html", "summary.json"}
    assert outputs <= files, files
    assert not [f for f in files if f.startswith(".") or "tmp" in f or "rank" in f], files   # no leftovers
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in recs] == [("pretrain", 3), ("pretrain", 6), ("grpo", 1), ("grpo", 2)]
    summary = json.load(open(tmp_path / "summary.json"))
    assert {"base", "final"} <= summary.keys()
