"""
nanor1: DeepSeek-R1-Zero in miniature. A tiny DeepSeek-V3 (MLA + DeepSeekMoE, see moe.py) is
pretrained from scratch on arithmetic, then trained with GRPO on verifiable rewards until it
learns, by itself, to think step by step before it answers.

    python nanor1.py                              # everything, on a 2-core CPU (11-14 min)
    python nanor1.py --stage grpo                 # one stage alone, from out/base.pt
    python nanor1.py --stage eval --init_from out/final.pt
    python nanor1.py ... --resume                 # continue a killed or stopped run (same flags)
    python nanor1.py --stage r1                   # the R1 recipe from out/base.pt: SFT, RL, SFT, RL (~6 min)
    python nanor1.py --stage distill              # a 4x smaller student: RL vs distilled from out/final.pt (~6 min)
    torchrun --standalone --nproc_per_node=8 nanor1.py --dim 256 ...   # many GPUs (see train.sh)
    python nanor1.py --help                       # every setting, with its default

The file reads top to bottom in the order things run: config, tokenizer, distributed setup,
pretraining, rewards, rollouts, evaluation, the GRPO math, the GRPO trainer, the rest of the R1
recipe (SFT, rejection sampling, distillation), plots, main().

Where nanor1 departs from DeepSeek-R1-Zero, and why:
  1. The task is arithmetic, generated in code, not competition math: answers are checkable by a
     parser, and a 1M-parameter model can learn it on a CPU in minutes.
  2. The base model is pretrained on a corpus where a minority of documents (--think_frac) are worked
     solutions in the R1 tag format. DeepSeek-V3-Base saw reasoning on the web; ours has to see it
     somewhere. GRPO still has to discover, from reward alone, that thinking pays.
  3. The prompt is just the problem ("(47+85)*3-29="), not R1's instruction template: a tiny model
     has no use for instructions. The format reward asks for the same <think>/<answer> shape.
  4. Rewards are rule-based exactly as in R1-Zero (accuracy + format); no neural reward model.
  5. GRPO as in DeepSeekMath: group-normalised advantages, PPO clipping, k3 KL to the frozen base.
     Dr. GRPO and DAPO variants are flags (--scale_by_std, --agg, --clip_high, --drop_zero_std).
  6. Everything is tiny: ~1.9M parameters (1.0M active), groups of 8, 40 RL steps.
  7. DeepSeek-R1's multi-stage recipe (--stage r1) and its distillation (--stage distill) are here in
     miniature, simplified as said in their section: generated cold-start data, reasoning data only.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import LEVELS, Problem, is_heldout, test_set, training_problems
from moe import KVCache, ModelConfig, Transformer

# -----------------------------------------------------------------------------
# Config: one dataclass for the run, plus moe.ModelConfig for the model; both become flags.


@dataclass
class Config:
    # run
    stage: str = "all"            # all | pretrain | grpo | eval (R1-Zero) | sft | rejection | distill | r1 (R1 recipe)
    out_dir: str = "out"          # checkpoints, metrics, plots, summary
    init_from: str = ""           # the stage's model (default: out_dir/base.pt; final.pt for eval, rejection, distill)
    seed: int = 1337
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "auto"           # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False         # torch.compile the training forward (CUDA)
    threads: int = 0              # torch CPU threads (0 = torch's default)
    resume: bool = False          # continue the run saved in out_dir/ckpt.pt (same flags; killed or stopped)
    # data
    think_frac: float = 0.4       # share of pretraining documents written as worked solutions (< 0.5: the base rarely thinks greedily)
    level_weights: str = "1,1,1,2"  # pretraining mix of add2,add3,mul,multi (multi's third step is hardest)
    n_test: int = 200             # held-out problems per level
    # pretraining
    pretrain_steps: int = 1800
    batch_size: int = 32          # rows per step (global, across ranks and accumulation)
    block_size: int = 128         # tokens per row, packed with whole documents
    grad_accum: int = 1           # micro-steps per step (divided among ranks)
    lr: float = 3e-3
    min_lr_frac: float = 0.1      # cosine decays to lr * min_lr_frac
    warmup_steps: int = 100
    weight_decay: float = 0.1     # on matrices only
    grad_clip: float = 1.0
    log_every: int = 100
    eval_every: int = 500         # quick held-out eval during pretraining (0 = never)
    ckpt_every: int = 250         # write out_dir/ckpt.pt every N pretraining steps (and at the end)
    # GRPO
    grpo_steps: int = 40
    prompts_per_step: int = 16    # global, across ranks
    group_size: int = 8           # G completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0                # 0 = sample from the full distribution
    grpo_lr: float = 1e-4
    mu: int = 1                   # policy updates per rollout batch
    clip_low: float = 0.2         # ratio clipped to [1-clip_low, 1+clip_high]
    clip_high: float = 0.2        # DAPO's clip-higher uses e.g. 0.28
    beta: float = 0.02            # weight of the k3 KL to the reference (base) model
    agg: str = "seq"              # seq (GRPO) | token (DAPO) | constant (Dr. GRPO)
    scale_by_std: bool = True     # divide advantages by the group std (False = Dr. GRPO)
    drop_zero_std: bool = False   # DAPO dynamic sampling: drop groups whose rewards are all equal
    acc_weight: float = 1.0       # reward = acc_weight * accuracy + format_weight * format
    format_weight: float = 0.2
    grpo_eval_every: int = 10     # held-out eval during GRPO (0 = only at the end)
    grpo_ckpt_every: int = 50     # write out_dir/ckpt.pt every N GRPO steps (and at the end)
    grpo_eval_n: int = 50         # problems per level for those evals
    eval_batch: int = 256         # sequences per generation batch in evaluation and rejection sampling
    # the R1 recipe: SFT, rejection sampling, distillation (stages sft, rejection, distill, r1)
    sft_data: str = ""            # jsonl of {"prompt", "completion"} for --stage sft (default: worked solutions)
    sft_epochs: int = 2           # passes over the SFT data (R1 fine-tunes for two epochs)
    sft_batch: int = 32           # examples per SFT step
    sft_lr: float = 3e-4          # peak SFT learning rate (warmup, then cosine to sft_lr * min_lr_frac)
    cold_start: int = 512         # worked solutions of training problems for the cold-start SFT
    rs_prompts: int = 1024        # training problems for rejection sampling
    rs_samples: int = 4           # K samples per problem; the right, well-formed, distinct ones are kept
    r1_grpo_steps: int = 50       # GRPO steps in each of --stage r1's two RL stages
    student_dim: int = 64         # the student's width; all its widths are the teacher's scaled by student_dim / dim
    student_layers: int = 0       # the student's layers (0 = as many as the teacher)
    student_pretrain_steps: int = 1800  # the student's pretraining steps (pretrain() on the teacher's corpus)
    student_grpo_steps: int = 0   # GRPO steps of the RL-only student (0 = as many as fit in the distilled one's time)
    model: ModelConfig = field(default_factory=ModelConfig)


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _field_help(cls):
    """The comment after each field in the dataclass source, used as its --help line."""
    import inspect
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):.*?=.*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit code 2, without the usage block (which lists every flag)."""
        self.exit(2, f"error: {message}; see --help\n")


def parse_args(argv=None) -> Config:
    """Flags -> Config. A bad flag or value ends here with one line on stderr and exit code 2."""
    p = _Parser(description="nanor1: DeepSeek-R1-Zero in miniature", allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls, group in ((Config, "run / data / training"), (ModelConfig, "model (moe.ModelConfig)")):
        g, helps = p.add_argument_group(group), _field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("model", "vocab_size"):
                continue
            default = f.default
            is_bool = isinstance(default, bool)
            flag = dict(type=_str2bool, nargs="?", const=True) if is_bool else dict(type=type(default))
            g.add_argument(f"--{f.name}", **flag, default=default, help=helps.get(f.name, f.name),
                           metavar=type(default).__name__.upper())   # a bare --resume means --resume true
    a = vars(p.parse_args(argv))
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = Config(**{k: v for k, v in a.items() if k not in model_keys},
                     model=ModelConfig(**{k: v for k, v in a.items() if k in model_keys}))
        validate(cfg)
    except ValueError as e:
        p.error(str(e).replace("ModelConfig.", "--"))   # ModelConfig's fields are flags too
    return cfg


RECIPE_STAGES = ("sft", "rejection", "distill", "r1")   # the rest of the R1 recipe (see that section)
MAX_PROMPT_TOKENS = 32   # room a rollout leaves for its prompt; the longest, "(99+99)*9-99=", is 14 tokens


def validate(cfg: Config):
    def need(ok, name, rule):
        if not ok:
            raise ValueError(f"--{name}={getattr(cfg, name)!r}: {rule}")
    need(cfg.stage in ("all", "pretrain", "grpo", "eval") + RECIPE_STAGES, "stage",
         "must be all, pretrain, grpo or eval (R1-Zero), or sft, rejection, distill or r1 (the R1 recipe)")
    need(cfg.agg in ("seq", "token", "constant"), "agg", "must be seq, token or constant")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be auto, float32 or bfloat16")
    need(0.0 <= cfg.think_frac <= 1.0, "think_frac", "must be in [0, 1]")
    level_weights(cfg)
    for name in ("batch_size", "block_size", "grad_accum", "prompts_per_step", "max_new_tokens", "mu",
                 "n_test", "grpo_eval_n", "eval_batch", "log_every"):
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("pretrain_steps", "grpo_steps", "warmup_steps", "eval_every",
                 "grpo_eval_every", "top_k", "threads", "beta", "weight_decay", "ckpt_every", "grpo_ckpt_every"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    for f in dataclasses.fields(cfg.model):
        if isinstance(getattr(cfg.model, f.name), float) and not math.isfinite(getattr(cfg.model, f.name)):
            raise ValueError(f"--{f.name}={getattr(cfg.model, f.name)!r}: must be a finite number")
    for f in dataclasses.fields(cfg):
        need(not isinstance(getattr(cfg, f.name), float) or math.isfinite(getattr(cfg, f.name)), f.name,
             "must be a finite number")
    need(cfg.group_size >= 2, "group_size", "must be >= 2 (advantages compare completions of a prompt)")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.grpo_lr > 0, "grpo_lr", "must be > 0")
    need(cfg.grad_clip > 0, "grad_clip", "must be > 0 (the gradient norm is clipped to it; 0 would zero it)")
    need(cfg.temperature > 0, "temperature", "must be > 0")
    need(0 <= cfg.clip_low < 1 and cfg.clip_high >= 0, "clip_low", "need 0 <= clip_low < 1 and clip_high >= 0")
    need(0 <= cfg.min_lr_frac <= 1, "min_lr_frac", "must be in [0, 1]")
    need(cfg.block_size <= cfg.model.max_seq_len, "block_size", f"must be <= --max_seq_len={cfg.model.max_seq_len}")
    need(cfg.max_new_tokens + MAX_PROMPT_TOKENS <= cfg.model.max_seq_len, "max_new_tokens",
         f"must be <= --max_seq_len={cfg.model.max_seq_len} - {MAX_PROMPT_TOKENS} (room for the prompt)")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device), "device", "must be auto, cpu, cuda or cuda:N")
    need(not cfg.device.startswith("cuda") or torch.cuda.is_available(), "device", "CUDA is not available here")
    need(not (cfg.resume and cfg.stage not in ("all", "pretrain", "grpo")), "resume",
         "only a training stage (all, pretrain, grpo) resumes; eval and the R1-recipe stages run again from the start")
    for name in ("sft_epochs", "sft_batch", "rs_samples", "student_dim"):
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("cold_start", "rs_prompts", "r1_grpo_steps", "student_layers", "student_pretrain_steps",
                 "student_grpo_steps"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.sft_lr > 0, "sft_lr", "must be > 0")
    world = int(os.environ.get("WORLD_SIZE", 1))   # processes started by torchrun (1 without it)
    need(cfg.batch_size % (accum_steps(cfg, world) * world) == 0, "batch_size",
         f"the global batch must split into {world} ranks x {accum_steps(cfg, world)} micro-steps")
    need(cfg.prompts_per_step % world == 0, "prompts_per_step", f"must be divisible by the world size {world}")
    need(world == 1 or cfg.stage not in RECIPE_STAGES, "stage",
         f"{cfg.stage} runs in one process (the R1-recipe stages do not shard over torchrun's ranks)")


def accum_steps(cfg: Config, world: int) -> int:
    """Micro-steps per rank: --grad_accum shared among the ranks (rounded up, so that no rank's
    micro-batch is larger than one process's), keeping the global batch fixed."""
    return -(-cfg.grad_accum // world)


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken, built in code. One token per byte (so every digit is one token) plus
# special tokens for the tags; nothing is downloaded.

SPECIALS = ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>"]


def build_tokenizer() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="nanor1", pat_str=r"\d|[^\d]+", mergeable_ranks=ranks,
                             special_tokens={s: 256 + i for i, s in enumerate(SPECIALS)})


enc = build_tokenizer()
EOT, THINK, END_THINK, ANSWER, END_ANSWER = (enc.encode_single_token(s) for s in SPECIALS)


def encode(text: str) -> list:
    return enc.encode(text, allowed_special="all")


def prompt_tokens(p: Problem) -> list:
    """What the model sees before it answers: end-of-text (the document separator) + "problem="."""
    return [EOT] + encode(f"{p.text}=")


# -----------------------------------------------------------------------------
# Distributed setup and small utilities

def setup(cfg: Config):
    """Returns (rank, world, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process it
    starts: then join the process group (nccl on CUDA, one GPU per process: cuda:LOCAL_RANK; gloo on
    CPU). A plain `python nanor1.py` is a world of one and touches nothing distributed."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return rank, world, torch.device(device)


def print0(*args, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kw, flush=True)


def autocast(cfg: Config, device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s"


# Dense bf16 tensor-core peaks (FLOP/s per GPU: fp32 accumulate, no 2:4 sparsity) from NVIDIA's
# datasheets, as regexes tried in order on torch.cuda.get_device_name(). Not listed, MFU is "unknown".
PEAK_FLOPS = [(r"H100.*PCIe", 756e12), (r"H[12]00.*NVL", 835e12), (r"H100|H200", 989e12),  # SXM, GH200
              (r"B200", 2250e12), (r"A100|A800", 312e12), (r"\bA30\b", 165e12), (r"\bA10\b", 125e12),
              (r"L40S", 362e12), (r"\bL40\b", 181e12), (r"\bL4\b", 121e12), (r"RTX A6000", 155e12),
              (r"RTX 4090", 165e12), (r"RTX 3090", 71e12)]


def peak_flops(device) -> float:
    """Peak FLOP/s for MFU: a table for GPUs (None = unknown), a measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for pattern, v in PEAK_FLOPS if re.search(pattern, name)), None)
    return _cpu_matmul_peak(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _cpu_matmul_peak(threads: int) -> float:
    """The best of several timed rounds of a large fp32 matmul (the first rounds warm up the
    threads and caches, and a shared machine is noisy; the best round is the closest to the peak).
    Measured once per thread count (~0.3 s)."""
    n, best = 1024, float("inf")
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(8):
        t = time.perf_counter()
        for _ in range(2):
            a @ b
        best = min(best, (time.perf_counter() - t) / 2)
    return 2 * n ** 3 / best


def save_checkpoint(path, model, cfg, **extra):
    """Atomic: write a temp file, flush it to disk, then rename it over path, so that a kill at any
    moment leaves the old checkpoint or the new one, never half of one. Plain types only (tensors,
    numbers, strings, dicts and lists of them), so torch.load(weights_only=True) reads it."""
    raw = model.module if hasattr(model, "module") else model
    raw = getattr(raw, "_orig_mod", raw)
    ckpt = {"model": raw.state_dict(), "model_config": dataclasses.asdict(raw.cfg),
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}, **extra}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _first_line(e: Exception) -> str:
    why = (str(e).strip().splitlines() or [""])[0][:200]
    return type(e).__name__ + (f": {why}" if why else "")


def read_checkpoint(path, device) -> dict:
    """torch.load(weights_only=True), with one clear line for a missing, truncated or corrupted file."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} not found (run the pretrain stage first, or pass --init_from)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"model", "model_config", "config"} <= ckpt.keys():
            raise ValueError("no model, model_config and config entries")
    except Exception as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: file is truncated, corrupted or not a nanor1 "
                         f"checkpoint ({_first_line(e)})")
    return ckpt


def load_checkpoint(path, device):
    """-> (model, checkpoint dict). A clear error for a missing or unreadable file."""
    ckpt = read_checkpoint(path, device)
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # weights of another model, or a config this version does not know
        raise SystemExit(f"error: cannot load checkpoint {path}: weights do not match its config ({_first_line(e)})")
    return model, ckpt


# Settings that do not change what a run computes: a resumed run may change them, not the others.
RESUME_FREE = {"stage", "out_dir", "init_from", "resume", "device", "threads", "compile", "log_every", "eval_every",
               "ckpt_every", "grpo_eval_every", "grpo_ckpt_every", "grpo_eval_n", "n_test", "eval_batch",
               # the R1-recipe stages' settings: an R1-Zero run (all, pretrain, grpo) never reads them
               "sft_data", "sft_epochs", "sft_batch", "sft_lr", "cold_start", "rs_prompts", "rs_samples",
               "r1_grpo_steps", "student_dim", "student_layers", "student_pretrain_steps", "student_grpo_steps"}


def config_error(message: str):
    """A setting that cannot work: one line on stderr and exit code 2, like a bad flag."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def read_resume_checkpoint(cfg: Config, device):
    """--resume: out_dir/ckpt.pt, checked against this run's settings before anything runs or is
    written. None if there is none yet: the run was stopped before its first checkpoint."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        print0(f"--resume: no {path} yet, so starting from the beginning")
        return None
    ckpt = read_checkpoint(path, device)
    if not {"stage", "step", "optimizer"} <= ckpt.keys() or ckpt["stage"] not in ("pretrain", "grpo"):
        raise SystemExit(f"error: cannot resume from {path}: not a training checkpoint (no stage, step and "
                         f"optimizer state)")
    then = {**ckpt["config"], **ckpt["model_config"]}
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
    now.update(dataclasses.asdict(dataclasses.replace(cfg.model, vocab_size=enc.n_vocab)))
    diff = [f"--{k} {then.get(k, '(unset)')!r} there, {v!r} now" for k, v in now.items()
            if k not in RESUME_FREE and then.get(k, "(unset)") != v]
    if diff:
        config_error(f"cannot resume from {path}: it was written with other settings: {'; '.join(diff)} "
                     f"(resume with that run's flags, or start a new run with another --out_dir)")
    where = f"{path} is at {ckpt['stage']} step {ckpt['step']}"
    if ckpt["stage"] == "pretrain" and cfg.stage == "grpo":
        config_error(f"cannot resume with --stage grpo: {where}; resume with --stage all or pretrain")
    if ckpt["stage"] == "grpo" and cfg.stage == "pretrain":
        config_error(f"nothing to resume with --stage pretrain: {where}, pretraining is done")
    print0(f"resuming: {where}")
    return ckpt


def truncate_metrics(cfg: Config, stage: str, step: int):
    """On resume, drop the log records written after the checkpoint (those steps run again) and
    any line a kill cut short."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    order = {"pretrain": 0, "grpo": 1}
    keep = []
    for line in open(path):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            r = json.loads(line)
            if (order[r["stage"]], r["step"]) <= (order[stage], step):
                keep.append(json.dumps(r) + "\n")
    with open(f"{path}.tmp", "w") as f:
        f.writelines(keep)
    os.replace(f"{path}.tmp", path)


# -----------------------------------------------------------------------------
# Stopping safely. A kill (SIGKILL, a crash, a power cut) loses at most the steps since the last
# checkpoint: the training loops write out_dir/ckpt.pt every ckpt_every steps, atomically, with the
# optimizer state, and draw each step's randomness from (seed, step, rank) alone, so --resume
# repeats exactly what the lost steps did. Ctrl-C (SIGINT) or SIGTERM during training loses
# nothing: the step finishes, ckpt.pt is written, and the run exits with 128 + the signal number
# (130 for Ctrl-C) after printing the command that resumes it. Outside the training loops
# (evaluations, plots) it exits at once: the last checkpoint already holds every finished step.

RUN = {"argv": [], "signal": None, "in_loop": False}   # argv: the flags that resume this run, set by main()


def resume_command() -> str:
    prog = sys.argv[0] if sys.argv[0].endswith(".py") else "nanor1.py"
    world = int(os.environ.get("WORLD_SIZE", 1))
    launch = f"torchrun --standalone --nproc_per_node={world} {prog}" if world > 1 else f"python {prog}"
    return f"{launch} {shlex.join(RUN['argv'])}"


def how_to_resume() -> str:
    """The R1-recipe stages chain several trainings and do not resume: they run again (RUN["argv"] None)."""
    if RUN["argv"] is None:
        return "this stage does not resume: run it again"
    return f"resume with: {resume_command()}"


def _on_signal(signum, frame):
    if RUN["in_loop"] and RUN["signal"] is None:   # the training loop stops after this step
        RUN["signal"] = signum
        os.write(2, b"\nstopping: finishing this step and saving a checkpoint (again to stop at once)\n")
        return
    os.write(2, f"\nstopped by {signal.Signals(signum).name}; {how_to_resume()}\n".encode())
    raise SystemExit(128 + signum)


def end_of_step(cfg: Config, model, opt, stage: str, step: int, total: int, every: int, rank: int, device):
    """After each finished step: write out_dir/ckpt.pt every `every` steps and after the last one;
    after a signal, write it now and exit. Every rank stops at the same step."""
    stop = RUN["signal"] is not None
    if dist.is_initialized():
        stop = all_reduce_sum(torch.tensor(float(stop), device=device)).item() > 0
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if rank == 0 and (stop or step == total or (every and step % every == 0)):
        save_checkpoint(path, model, cfg, stage=stage, step=step, optimizer=opt.state_dict())
    if stop:
        signum = RUN["signal"] or signal.SIGINT
        print0(f"stopped by {signal.Signals(signum).name} at {stage} step {step}/{total}, saved {path}; "
               f"{how_to_resume()}")
        sys.exit(128 + signum)


def check_finite(cfg: Config, stage: str, step: int, total: int, loss: float, grad_norm: float, lr_flag: str):
    """A NaN or infinite loss or gradient stops the run before the update reaches the weights, so the
    last checkpoint stays the last good one."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        kept = f"the last checkpoint, {path}, is kept" if os.path.exists(path) else "no checkpoint was written"
        raise SystemExit(f"error: non-finite loss at {stage} step {step}/{total} (loss {loss:.4g}, grad norm "
                         f"{grad_norm:.4g}): stopped before the update; {kept}. Try a lower {lr_flag}")


def optimizer_step(cfg: Config, model, opt, lr: float, loss: float, stage: str, step: int, total: int,
                   lr_flag: str) -> torch.Tensor:
    """One update, the same in every stage: clip the gradient norm, stop on a non-finite loss or
    gradient, AdamW at lr, then the router bias update -> the expert loads it used."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    check_finite(cfg, stage, step, total, loss, norm.item(), lr_flag)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model.update_router_biases()


def log_metrics(cfg, record: dict):
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# Pretraining: next-token prediction on packed rows of arithmetic documents

def pretrain_batches(cfg: Config, rng: random.Random, rows: int):
    """Endless (x, y) batches: `rows` rows of block_size tokens, each packed with whole documents.

    A row is end-of-text, then documents each followed by end-of-text (so the model learns to stop,
    and every document starts after an end-of-text as prompts do). A document is a problem (levels
    mixed by --level_weights) with its direct answer, or (with probability think_frac) its worked
    solution. Documents are never split: each row takes, first fit, documents from a small queue, so
    every generated document is used and the row's padded tail is short. Targets are the next
    tokens, -1 on padding (ignored by the loss).
    """
    problems, queue, T = training_problems(rng, weights=level_weights(cfg)), [], cfg.block_size + 1
    while True:
        xs, ys = [], []
        for _ in range(rows):
            row = [EOT]
            while True:
                while len(queue) < 16:
                    p = next(problems)
                    doc = encode(p.document(think=rng.random() < cfg.think_frac)) + [EOT]
                    if len(doc) + 1 > T:
                        raise SystemExit(f"error: --block_size={cfg.block_size} is shorter than a document "
                                         f"({len(doc) + 1} tokens)")
                    queue.append(doc)
                fit = next((i for i, d in enumerate(queue) if len(row) + len(d) <= T), None)
                if fit is None:
                    break
                row += queue.pop(fit)
            xs.append(row[:-1] + [EOT] * (T - len(row)))
            ys.append(row[1:] + [-1] * (T - len(row)))
        yield torch.tensor(xs), torch.tensor(ys)


def level_weights(cfg: Config) -> list:
    """--level_weights "1,1,1,2" -> [1.0, 1.0, 1.0, 2.0], one per level of LEVELS."""
    try:
        w = [float(x) for x in cfg.level_weights.split(",")]
    except ValueError:
        w = []
    if len(w) != len(LEVELS) or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--level_weights={cfg.level_weights!r}: must be {len(LEVELS)} comma-separated "
                         f"numbers >= 0, not all 0 (one per level: {','.join(LEVELS)})")
    return w


def lr_at(step: int, total: int, cfg: Config, base_lr: float) -> float:
    """Linear warmup, then cosine decay to base_lr * min_lr_frac."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return base_lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, lr, weight_decay, device):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def wrap_ddp(model, device):
    """DistributedDataParallel under torchrun (the model itself otherwise): backward averages the
    gradients over the ranks.

    MoE: an expert that received no tokens on this rank takes no part in its backward, and plain DDP
    then waits for that gradient forever ("Expected to have finished reduction in the prior
    iteration"). find_unused_parameters=True makes DDP walk the autograd graph after each forward and
    count such parameters as zero from this rank, so the average is exactly one process's gradient
    over the same global batch, and an expert idle on every rank keeps grad None and is skipped by
    AdamW, as in one process. (The alternative, adding 0 * every expert's output to the loss, would
    hand idle experts zero gradients that AdamW still steps with momentum and weight decay, and
    would put a trick into moe.py.) The graph walk costs little next to the expert loop itself.

    forward_sync_buffers=False: no buffer needs DDP's broadcast from rank 0 before a forward. The
    router biases stay identical because every rank applies the same update, from the loads summed
    over ranks (Transformer.update_router_biases); the loads (Gate.load) are this rank's own counts
    and must not be replaced by rank 0's (harmless today only because the broadcast comes when they
    are all zero); the rope table is a constant.
    """
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
        forward_sync_buffers=False)


def pretrain(cfg: Config, model: Transformer, device, rank: int, world: int, tests: dict, resume: dict = None):
    """Pretrain model in place; resume: a checkpoint of this stage to continue from (see main)."""
    accum = accum_steps(cfg, world)
    rows = cfg.batch_size // (accum * world)          # rows per micro-step on this rank
    if rows * accum * world != cfg.batch_size:
        raise SystemExit(f"error: --batch_size={cfg.batch_size} must be divisible by "
                         f"micro-steps x world size = {accum * world}")
    # one seed per step and micro-batch of the global batch, rank r taking micro-batches r*accum...:
    # the data depend on the seed, the step and the number of micro-batches, not on how they are
    # spread over ranks (2 ranks x 1 micro-step train on exactly what 1 rank x 2 micro-steps trains
    # on), nor on earlier steps (a resumed run trains on exactly what an uninterrupted one would)
    def batch(step, micro):
        seed = f"{cfg.seed}-pretrain-{step}-{rank * accum + micro}"
        return next(pretrain_batches(cfg, random.Random(seed), rows))
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    start = resume["step"] if resume else 0
    if resume:
        opt.load_state_dict(resume["optimizer"])
    ddp = wrap_ddp(model, device)
    fwd = torch.compile(ddp) if cfg.compile else ddp
    flops_tok, peak = model.flops_per_token(cfg.block_size), peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.block_size
    print0(f"pretraining: {model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active), "
           f"{cfg.pretrain_steps} steps x {tokens_per_step} tokens, think_frac {cfg.think_frac}, "
           f"levels {cfg.level_weights} ({','.join(LEVELS)})")
    t_start, t_last, step_last, losses = time.time(), time.time(), start, []
    RUN["in_loop"] = True
    for step in range(start, cfg.pretrain_steps):
        lr = lr_at(step, cfg.pretrain_steps, cfg, cfg.lr)
        for micro in range(accum):
            x, y = (t.to(device) for t in batch(step, micro))
            sync = micro == accum - 1 or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with autocast(cfg, device):
                    logits, aux = fwd(x, doc_ids=(x == EOT).cumsum(1))   # each document attends to itself only
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
                ((loss + aux) / accum).backward()
            losses.append(loss.item())
        loads = optimizer_step(cfg, model, opt, lr, sum(losses[-accum:]), "pretrain", step + 1, cfg.pretrain_steps,
                               "--lr")
        if (step + 1) % cfg.log_every == 0 or step == cfg.pretrain_steps - 1:
            dt = (time.time() - t_last) / (step + 1 - step_last)   # seconds per step since the last line
            t_last, step_last = time.time(), step + 1
            loss_avg = all_reduce_sum(torch.tensor(sum(losses) / len(losses), device=device)).item() / world
            losses = []
            tok_s = tokens_per_step / dt
            mfu = f"{100 * flops_tok * tok_s / world / peak:.0f}%" if peak else "unknown"
            eta = (time.time() - t_start) / (step + 1 - start) * (cfg.pretrain_steps - step - 1)
            imbalance = (loads.max(1).values / loads.mean(1).clamp_min(1)).mean().item() if loads.numel() else 0
            print0(f"pretrain {step + 1:05d}/{cfg.pretrain_steps} | loss {loss_avg:.3f} | lr {lr:.1e} | "
                   f"{1000 * dt:.0f}ms | {tok_s / 1e3:.1f}k tok/s | mfu {mfu} | "
                   f"expert max/mean {imbalance:.2f} | eta {fmt_time(eta)}")
            log_metrics(cfg, {"stage": "pretrain", "step": step + 1, "loss": loss_avg, "lr": lr, "tok_s": tok_s,
                              "expert_load": loads.tolist()})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.pretrain_steps:
            res = evaluate(model, subset(tests, 32), cfg, device)
            print0("  held-out (greedy, 32/level): " + levels_line(res))
            res = evaluate(model, subset(tests, 32), cfg, device, force="think")
            print0("  held-out (greedy, 32/level, forced to think): " + levels_line(res))
        end_of_step(cfg, model, opt, "pretrain", step + 1, cfg.pretrain_steps, cfg.ckpt_every, rank, device)
    RUN["in_loop"] = False
    return model


# -----------------------------------------------------------------------------
# Rewards (R1-Zero): rule-based, computed by parsing. Model output is untrusted text: it is
# matched against fixed patterns and never evaluated.

_INT = re.compile(r"-?[0-9]{1,4000}")  # ASCII digits only: "٣" or "³" is not a digit here
_FORMAT = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


def parse_answer(completion: str):
    """The integer inside the single <answer>...</answer>, or None."""
    # BEGIN ASSIGNMENT rewards
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    start, end = completion.index("<answer>") + len("<answer>"), completion.index("</answer>")
    content = completion[start:end].strip(" \t\n\r") if start <= end else ""
    return int(content) if _INT.fullmatch(content) else None
    # END ASSIGNMENT


def accuracy_reward(completion: str, answer: int) -> float:
    """1.0 iff the single <answer> holds exactly the right integer."""
    # BEGIN ASSIGNMENT rewards
    return 1.0 if parse_answer(completion) == answer else 0.0
    # END ASSIGNMENT


def format_reward(completion: str) -> float:
    """1.0 iff the completion is <think>thoughts</think><answer>answer</answer>: one of each tag,
    in that order, neither part empty, nothing but whitespace around them."""
    # BEGIN ASSIGNMENT rewards
    if any(completion.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    m = _FORMAT.fullmatch(completion)
    return 1.0 if m and m.group(1).strip() and m.group(2).strip() else 0.0
    # END ASSIGNMENT


def total_reward(completion: str, answer: int, cfg: Config) -> float:
    return cfg.acc_weight * accuracy_reward(completion, answer) + cfg.format_weight * format_reward(completion)


# -----------------------------------------------------------------------------
# Rollouts: batched sampling with the absorbed MLA cache

def left_pad(prompts: list, device):
    """-> tokens (B, P) left-padded with end-of-text, key_mask (B, P) False on the padding."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), EOT, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = True
    return tokens.to(device), mask.to(device)


def sample(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B, V): the first whose cumulative probability exceeds u * total,
    with u uniform in [0, 1). Exact, and one random number per row where torch.multinomial draws
    V of them (the largest cost of a decoding step after the model itself on a CPU)."""
    cdf = probs.double().cumsum(-1)                                             # fp64: u * total < total
    if not torch.isfinite(cdf[:, -1]).all():
        raise SystemExit("error: cannot sample: the model's probabilities are NaN or infinite (non-finite weights?)")
    u = torch.rand(probs.size(0), 1, dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.size(-1) - 1).squeeze(1)


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, greedy: bool = False, generator=None, autocast_ctx=None):
    """Sample completions for a batch of token-list prompts.

    Returns (completions (B, L), mask (B, L): 1 up to and including the first end-of-text,
    truncated (B,) bool: no end-of-text within max_new_tokens). Finished rows are padded with EOT.
    """
    device = model.embed.weight.device
    tokens, key_mask = left_pad(prompts, device)
    B, P = tokens.shape
    cache = KVCache(model.cfg, B, P + max_new_tokens, kind="absorb", device=device)
    out = torch.full((B, max_new_tokens), EOT, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with autocast_ctx or contextlib.nullcontext():
        logits, _ = model(tokens, cache=cache, key_mask=key_mask)                # prefill
        for t in range(max_new_tokens):
            last = logits[:, -1].float()
            if greedy:
                nxt = last.argmax(-1)
            else:
                last = last / temperature
                if top_k:
                    kth = last.topk(min(top_k, last.size(-1))).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = sample(last.softmax(-1), generator)
            nxt = nxt.masked_fill(done, EOT)
            out[:, t] = nxt
            done |= nxt == EOT
            if done.all():
                break
            logits, _ = model(nxt[:, None], start_pos=P + t, cache=cache)       # one token, cached
    out = out[:, :t + 1]
    is_eot = (out == EOT).int()
    mask = (is_eot.cumsum(1) - is_eot) == 0                                     # up to the first EOT
    return out, mask, ~done


def response_lengths(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Tokens of each response, its end-of-text not counted (a truncated one has none)."""
    return mask.sum(1) - (~truncated).long()


def completion_text(tokens: torch.Tensor) -> str:
    """Decode a completion up to (not including) its first end-of-text."""
    ids = tokens.tolist()
    return enc.decode(ids[:ids.index(EOT)] if EOT in ids else ids)


# -----------------------------------------------------------------------------
# Evaluation: held-out accuracy per level, how often the model thinks, how long it writes

def subset(tests: dict, n: int) -> dict:
    return {lvl: ps[:n] for lvl, ps in tests.items()}


@torch.no_grad()
def evaluate(model, tests: dict, cfg: Config, device, greedy: bool = True, seed: int = 0, force: str = "") -> dict:
    """-> {level and "overall": {accuracy, think_rate, mean_length, format}}; sharded over ranks.

    force="think" or "answer" starts every completion with that tag: the accuracy the model would
    have if it always thought, or always answered directly.
    """
    forced = {"": [], "think": [THINK], "answer": [ANSWER]}[force]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    items = [(li, p) for li, lvl in enumerate(tests) for p in tests[lvl]][rank::world]
    sums = torch.zeros(len(tests), 5, dtype=torch.float64)   # n, correct, think, length, format
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    was_training = model.training
    model.eval()
    for i in range(0, len(items), cfg.eval_batch):
        chunk = items[i:i + cfg.eval_batch]
        comps, mask, truncated = generate(model, [prompt_tokens(p) + forced for _, p in chunk], cfg.max_new_tokens,
                                  temperature=cfg.temperature, greedy=greedy, generator=gen,
                                  autocast_ctx=autocast(cfg, device))
        lengths = response_lengths(mask, truncated).tolist()
        for (li, p), comp, n in zip(chunk, comps, lengths):
            text = enc.decode(forced) + completion_text(comp)
            sums[li] += torch.tensor([1, accuracy_reward(text, p.answer), text.startswith("<think>"),
                                      n, format_reward(text)], dtype=torch.float64)
    model.train(was_training)
    sums = all_reduce_sum(sums.to(device)).cpu()

    def row(s):
        n = max(s[0].item(), 1)
        return {"accuracy": s[1].item() / n, "think_rate": s[2].item() / n,
                "mean_length": s[3].item() / n, "format": s[4].item() / n}
    res = {lvl: row(sums[li]) for li, lvl in enumerate(tests)}
    res["overall"] = row(sums.sum(0))
    return res


def levels_line(res: dict) -> str:
    return " | ".join(f"{k} {v['accuracy']:.2f}" for k, v in res.items()) + \
        f" | think {res['overall']['think_rate']:.2f} | len {res['overall']['mean_length']:.1f}"


# -----------------------------------------------------------------------------
# The GRPO math (DeepSeekMath eq. 3, R1-Zero), one small pure function per piece.
#
#   A_i      = (r_i - mean(r)) / (std(r) + eps)                    group-relative advantage
#   ratio_t  = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)     per token
#   D_k3     = exp(ref - logp) - (ref - logp) - 1                  unbiased, always >= 0 KL estimate
#   L        = -mean[ min(ratio A, clip(ratio, 1-e_low, 1+e_high) A) - beta D_k3 ]

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale_by_std: bool = True) -> torch.Tensor:
    """rewards: (n_prompts * G,), groups contiguous -> advantages of the same shape."""
    # BEGIN ASSIGNMENT advantages
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)   # unbiased std, as in GRPO
    return adv.reshape(-1)
    # END ASSIGNMENT


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (over all entries, or along dim)."""
    # BEGIN ASSIGNMENT grpo_loss
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1e-8)
    # END ASSIGNMENT


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from samples of pi_theta."""
    # BEGIN ASSIGNMENT grpo_loss
    d = ref_logp - logp
    return torch.exp(d) - d - 1
    # END ASSIGNMENT


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.2,
              beta: float = 0.04, agg: str = "seq", max_len=None):
    """Clipped surrogate + k3 KL. logp/old_logp/ref_logp/mask: (B, L); advantages: (B,).

    agg="seq": mean over each completion's tokens, then over completions (GRPO);
    "token": mean over all tokens of the batch (DAPO); "constant": sum / (B * max_len) (Dr. GRPO).
    Returns (loss, stats) with stats["clip_frac"] and stats["kl"] (floats).
    """
    # BEGIN ASSIGNMENT grpo_loss
    ratio = torch.exp(logp - old_logp)
    A = advantages.unsqueeze(1)                                              # (B, 1)
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * A
    per_token = -torch.minimum(unclipped, clipped)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    if agg == "seq":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif agg == "token":
        loss = masked_mean(per_token, mask)
    elif agg == "constant":
        loss = (per_token * mask).sum() / (mask.size(0) * (max_len or mask.size(1)))
    else:
        raise ValueError(f"agg must be 'seq', 'token' or 'constant', got {agg!r}")
    with torch.no_grad():
        is_clipped = ((ratio < 1 - clip_low) & (A < 0)) | ((ratio > 1 + clip_high) & (A > 0))
        stats = {"clip_frac": masked_mean(is_clipped.float(), mask).item(),
                 "kl": masked_mean(kl, mask).item()}
    return loss, stats
    # END ASSIGNMENT


# -----------------------------------------------------------------------------
# The GRPO trainer

def sequence_logprobs(model, tokens, key_mask, P: int, autocast_ctx):
    """log pi(completion token | everything before) for tokens[:, P:]: (B, L); also entropy (B, L)
    and the model's balance loss."""
    with autocast_ctx:
        logits, aux = model(tokens[:, :-1], key_mask=key_mask[:, :-1])
    logits = logits[:, P - 1:].float()                                       # predictions of tokens[:, P:]
    logprobs = logits.log_softmax(-1)
    logp = logprobs.gather(-1, tokens[:, P:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy, aux


def grpo(cfg: Config, model: Transformer, ref: Transformer, device, rank: int, world: int, tests: dict,
         history: list, reward_fn=None, resume: dict = None, max_seconds: float = 0):
    """Train model with GRPO against the frozen ref. reward_fn(text, problem) -> float replaces the
    R1-Zero reward (acc_weight * accuracy + format_weight * format) when given, e.g. in tests.
    resume: a checkpoint of this stage to continue from (see main). max_seconds > 0: stop after
    the step that reaches this wall time (at most grpo_steps; one process only: ranks' clocks
    differ), to compare methods at equal cost."""
    if cfg.prompts_per_step % world:
        raise SystemExit(f"error: --prompts_per_step={cfg.prompts_per_step} must be divisible by the world size {world}")
    n_prompts, G = cfg.prompts_per_step // world, cfg.group_size   # each rank owns whole groups
    gen = torch.Generator(device=device)
    opt = make_optimizer(model, cfg.grpo_lr, 0.0, device)
    start = resume["step"] if resume else 0
    if resume:
        opt.load_state_dict(resume["optimizer"])
    ddp = wrap_ddp(model, device)
    ref.eval().requires_grad_(False)
    ctx = autocast(cfg, device)
    budget = f", stopping after {max_seconds:.0f}s of wall time" if max_seconds else ""
    print0(f"GRPO: {'up to ' if max_seconds else ''}{cfg.grpo_steps} steps x {cfg.prompts_per_step} prompts x G={G}, "
           f"lr {cfg.grpo_lr}, beta {cfg.beta}, clip [{1 - cfg.clip_low:.2f}, {1 + cfg.clip_high:.2f}], agg {cfg.agg}{budget}")
    t_start = time.time()
    RUN["in_loop"] = True
    for step in range(start, cfg.grpo_steps):
        # 1) rollouts: G samples per prompt from the current policy (pi_old). The problems and the
        # samples depend on (seed, step, rank) alone, so a resumed run draws what this one would
        t0 = time.time()
        rng = random.Random(f"{cfg.seed}-grpo-{step}-{rank}")
        problems = training_problems(rng)
        batch = [next(problems) for _ in range(n_prompts)]
        gen.manual_seed(rng.getrandbits(63))
        prompts = [prompt_tokens(p) for p in batch for _ in range(G)]
        model.eval()
        comps, comp_mask, truncated = generate(model, prompts, cfg.max_new_tokens, cfg.temperature,
                                               cfg.top_k, generator=gen, autocast_ctx=ctx)
        texts = [completion_text(c) for c in comps]
        answers = [p.answer for p in batch for _ in range(G)]
        acc = torch.tensor([accuracy_reward(t, a) for t, a in zip(texts, answers)])
        fmt = torch.tensor([format_reward(t) for t in texts])
        rewards = cfg.acc_weight * acc + cfg.format_weight * fmt
        if reward_fn is not None:
            rewards = torch.tensor([float(reward_fn(t, p)) for t, p in zip(texts, (p for p in batch for _ in range(G)))])
        # 2) advantages; groups whose rewards are all equal carry no signal
        advantages = group_advantages(rewards, G, scale_by_std=cfg.scale_by_std)
        zero_std = (rewards.view(-1, G).std(1) == 0)
        keep = ~zero_std.repeat_interleave(G) if cfg.drop_zero_std else torch.ones(len(texts), dtype=torch.bool)
        t_gen = time.time() - t0
        # 3) policy update(s) on the kept completions
        t0 = time.time()
        prompt_tok, prompt_mask = left_pad(prompts, device)
        P = prompt_tok.size(1)
        tokens = torch.cat([prompt_tok, comps], 1)
        key_mask = torch.cat([prompt_mask, torch.ones_like(comp_mask)], 1)
        idx = keep.nonzero().squeeze(1).to(device)
        # this rank's share of the kept rows and tokens of all ranks, relative to an even split (1.0 in
        # one process, or when every rank keeps as many): the loss is scaled by it, so that DDP's
        # average over ranks is exactly the loss of the whole batch, however unevenly groups were dropped
        kept = torch.tensor([len(idx), comp_mask[idx].sum().item()], dtype=torch.float64, device=device)
        kept_all = all_reduce_sum(kept.clone())
        share_rows, share_tok = (world * kept / kept_all.clamp_min(1)).tolist()
        stats = {"clip_frac": 0.0, "kl": 0.0, "loss": 0.0}
        entropy, loads = 0.0, None
        if kept_all[0] > 0:   # the same on every rank: DDP needs a backward from each rank, or none
            if not len(idx):  # all of this rank's groups were dropped: one row at weight 0, in eval mode
                idx = idx.new_zeros(1)   # (no router counts, no balance loss) just to join the backward
            tokens, key_mask, mask, adv = tokens[idx], key_mask[idx], comp_mask[idx], advantages.to(device)[idx]
            with torch.no_grad():
                ref_logp = sequence_logprobs(ref, tokens, key_mask, P, ctx)[0] if cfg.beta else None
                old_logp = sequence_logprobs(model, tokens, key_mask, P, ctx)[0] if cfg.mu > 1 else None
            model.train(share_rows > 0)
            for _ in range(cfg.mu):
                logp, ent, aux = sequence_logprobs(ddp, tokens, key_mask, P, ctx)
                loss, stats = grpo_loss(logp, logp.detach() if old_logp is None else old_logp, ref_logp, adv, mask,
                                        cfg.clip_low, cfg.clip_high, cfg.beta, cfg.agg, cfg.max_new_tokens)
                loss = loss * (share_tok if cfg.agg == "token" else share_rows)
                (loss + aux * share_rows).backward()
                loads = optimizer_step(cfg, model, opt, cfg.grpo_lr, loss.item(), "grpo", step + 1, cfg.grpo_steps,
                                       "--grpo_lr")
                stats["loss"] = loss.item()
            entropy = masked_mean(ent.detach(), mask).item()
            # per-token means, weighted by this rank's share of the kept tokens for the average below
            stats["kl"], stats["clip_frac"], entropy = (v * share_tok for v in (stats["kl"], stats["clip_frac"], entropy))
        t_upd = time.time() - t0
        # 4) log: means over all ranks (every rank holds as many completions; see share_tok for kl etc.)
        lengths = response_lengths(comp_mask, truncated).float()
        think = torch.tensor([t.startswith("<think>") for t in texts], dtype=torch.float)
        m = torch.tensor([rewards.mean(), acc.mean(), fmt.mean(), lengths.mean().item(), think.mean(),
                          stats["kl"], stats["clip_frac"], entropy, zero_std.float().mean(),
                          truncated.float().mean().item(), stats["loss"]], dtype=torch.float64)
        m = (all_reduce_sum(m.to(device)) / world).cpu().tolist()
        rec = dict(zip(["reward", "acc", "fmt", "length", "think", "kl", "clip_frac", "entropy", "zero_std",
                        "truncated", "loss"], m))
        elapsed = time.time() - t_start
        last = step + 1 == cfg.grpo_steps or 0 < max_seconds <= elapsed
        eta = 0 if last else elapsed / (step + 1 - start) * (cfg.grpo_steps - step - 1)
        eta = min(eta, max(0, max_seconds - elapsed)) if max_seconds else eta
        of = f"{elapsed:.0f}s/{max_seconds:.0f}s" if max_seconds else f"{cfg.grpo_steps}"
        print0(f"grpo {step + 1:03d}/{of} | reward {rec['reward']:.2f} (acc {rec['acc']:.2f} "
               f"fmt {rec['fmt']:.2f}) | len {rec['length']:5.1f} | think {rec['think']:.2f} | kl {rec['kl']:.3f} | "
               f"clip {rec['clip_frac']:.3f} | ent {rec['entropy']:.2f} | zero-std {rec['zero_std']:.2f} | "
               f"trunc {rec['truncated']:.2f} | gen {t_gen:.1f}s train {t_upd:.1f}s | eta {fmt_time(eta)}")
        rec.update(stage="grpo", step=step + 1, t_gen=t_gen, t_update=t_upd)
        if loads is not None and loads.numel():
            rec["expert_load"] = loads.tolist()
        if (cfg.grpo_eval_every and (step + 1) % cfg.grpo_eval_every == 0) or last:
            res = evaluate(model, subset(tests, cfg.grpo_eval_n), cfg, device)
            print0(f"  held-out (greedy, {cfg.grpo_eval_n}/level): " + levels_line(res))
            rec["heldout"] = res
        log_metrics(cfg, rec)
        history.append(rec)
        end_of_step(cfg, model, opt, "grpo", step + 1, step + 1 if last else cfg.grpo_steps, cfg.grpo_ckpt_every,
                    rank, device)
        if last:
            break
    RUN["in_loop"] = False
    return model


# -----------------------------------------------------------------------------
# The rest of the R1 recipe (DeepSeek-R1, sec 2.3-2.4 and 4.1). R1-Zero, above, is RL from the
# base alone; DeepSeek-R1 wraps RL between rounds of supervised fine-tuning:
#
#   1. cold start: SFT of the base on a small set of readable worked solutions (sec 2.3.1);
#   2. reasoning-oriented RL, GRPO as in R1-Zero (sec 2.3.2);
#   3. rejection sampling from that RL checkpoint: sample several responses per prompt, keep only
#      the correct ones, and fine-tune the *base* (DeepSeek-V3-Base) on them for two epochs (2.3.3);
#   4. RL again (sec 2.3.4).
#
# Distillation (sec 2.4): small models fine-tuned on the strong model's rejection-sampled traces,
# with SFT alone; sec 4.1 finds them far better than the same small models trained with RL.
#
# Where nanor1 simplifies: the cold-start data are the generated worked solutions of data/arith.py
# (R1's are thousands of long CoTs refined by people); stage 3 keeps reasoning data only (R1 adds
# 200k non-reasoning samples) and filters with the R1-Zero rewards (correct and well formed, each
# distinct response once), not R1's language and readability filters; stage 4 keeps the rule-based
# reward (R1 adds reward models for helpfulness and harmlessness). These stages run in one process
# and do not resume: each takes minutes on a CPU. They write into out_dir/<stage>/ and merge their
# results into out_dir/summary.json.

def worked_solutions(n: int, seed) -> list:
    """Cold-start data: n training problems with their worked solutions, written exactly as the
    pretraining corpus writes them, as records {level, problem, answer, prompt, completion}."""
    problems = training_problems(random.Random(f"{seed}-cold-start"))
    out = []
    for p in (next(problems) for _ in range(n)):
        prompt = f"{p.text}="
        out.append({"level": p.level, "problem": p.text, "answer": p.answer, "prompt": prompt,
                    "completion": p.document(think=True).removeprefix(prompt)})
    return out


def sft_batch(examples: list):
    """(prompt tokens, completion tokens) pairs -> x, y (B, T). Row i is prompt + completion, right-
    padded with end-of-text (causal attention: the padding after a row changes nothing before it).
    y[t] is the token after x[t] where that token belongs to the completion, its final end-of-text
    included (so the model learns to stop); -1 elsewhere: the prompt and the padding are context
    the model reads, not text it is taught to write."""
    T = max(len(p) + len(c) for p, c in examples) - 1
    x = torch.full((len(examples), T), EOT, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        seq = torch.tensor(p + c)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]                          # targets of the completion
    return x, y


def sft_loss(model, x, y, autocast_ctx):
    """Mean cross-entropy over the completion tokens of the batch (targets -1 are skipped), and the
    model's balance loss."""
    with autocast_ctx:
        logits, aux = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1), aux


def sft(cfg: Config, model: Transformer, examples: list, steps: int, lr: float, device, name: str = "sft"):
    """Supervised fine-tuning in place on (prompt tokens, completion tokens) pairs, the loss on the
    completions only. Each step takes sft_batch examples, epoch after epoch in a seeded shuffle;
    AdamW with warmup (a tenth of the steps, at most warmup_steps) and cosine decay as in pretraining."""
    if not examples:
        raise SystemExit(f"error: {name}: no examples to fine-tune on (rejection sampling kept none?)")
    opt = make_optimizer(model, lr, cfg.weight_decay, device)
    schedule = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, steps // 10))
    rng, order, ctx = random.Random(f"{cfg.seed}-{name}"), [], autocast(cfg, device)
    every = max(1, min(cfg.log_every, steps // 10))
    print0(f"{name}: {len(examples)} examples, {steps} steps x {cfg.sft_batch}, lr {lr}, completion tokens only")
    model.train()
    t_start, t_last, losses = time.time(), time.time(), []
    for step in range(steps):
        while len(order) < cfg.sft_batch:                                     # the next epoch, reshuffled
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch, order = [examples[i] for i in order[:cfg.sft_batch]], order[cfg.sft_batch:]
        lr_now = lr_at(step, steps, schedule, lr)
        x, y = (t.to(device) for t in sft_batch(batch))
        loss, aux = sft_loss(model, x, y, ctx)
        (loss + aux).backward()
        optimizer_step(cfg, model, opt, lr_now, loss.item(), name, step + 1, steps, "--sft_lr")
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            dt = (time.time() - t_last) / len(losses)
            eta = (time.time() - t_start) / (step + 1) * (steps - step - 1)
            print0(f"{name} {step + 1:04d}/{steps} | loss {sum(losses) / len(losses):.3f} | lr {lr_now:.1e} | "
                   f"{1000 * dt:.0f}ms | eta {fmt_time(eta)}")
            log_metrics(cfg, {"stage": name, "step": step + 1, "loss": sum(losses) / len(losses), "lr": lr_now})
            t_last, losses = time.time(), []
    return model


def fine_tune(cfg: Config, model: Transformer, records: list, device, name: str):
    """sft() on {prompt, completion} text records for sft_epochs epochs (R1: two)."""
    examples = [([EOT] + encode(r["prompt"]), encode(r["completion"]) + [EOT]) for r in records]
    return sft(cfg, model, examples, math.ceil(cfg.sft_epochs * len(examples) / cfg.sft_batch), cfg.sft_lr,
               device, name)


def fresh_problems(cfg: Config, name: str, n: int) -> list:
    """n training problems from a stream of their own, seeded by (seed, name), not GRPO's."""
    problems = training_problems(random.Random(f"{cfg.seed}-{name}"))
    return [next(problems) for _ in range(n)]


@torch.no_grad()
def rejection_sample(cfg: Config, model: Transformer, problems: list, k: int, device, seed: int = 0,
                     path: str = "") -> list:
    """R1's rejection sampling (sec 2.3.3): k sampled completions per problem (temperature, top_k),
    kept iff right and well formed (accuracy and format reward both 1), each distinct (problem,
    completion) once. Training problems only: a held-out one would leak the test set into the
    fine-tuning data. -> records {level, problem, answer, prompt, completion}, also written to path."""
    held = [p.text for p in problems if is_heldout(p.text)]
    if held:
        raise ValueError(f"rejection sampling is for training problems; held out: {', '.join(held[:3])}")
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    kept, seen, right = [], set(), 0
    per_batch = max(1, cfg.eval_batch // k)                                  # problems per generation batch
    for i in range(0, len(problems), per_batch):
        chunk = problems[i:i + per_batch]
        comps, _, _ = generate(model, [prompt_tokens(p) for p in chunk for _ in range(k)], cfg.max_new_tokens,
                               cfg.temperature, cfg.top_k, generator=gen, autocast_ctx=autocast(cfg, device))
        for j, comp in enumerate(comps):
            p, text = chunk[j // k], completion_text(comp)
            if accuracy_reward(text, p.answer) == 1.0 and format_reward(text) == 1.0:
                right += 1
                if (p.text, text) not in seen:
                    seen.add((p.text, text))
                    kept.append({"level": p.level, "problem": p.text, "answer": p.answer, "prompt": f"{p.text}=",
                                 "completion": text})
    model.train(was_training)
    print0(f"rejection sampling: {len(problems)} problems x {k} samples: {right} right and well formed, "
           f"{len(kept)} distinct kept")
    if path:
        write_jsonl(path, kept)
    return kept


def write_jsonl(path: str, records: list):
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(f"{path}.tmp", path)


def read_sft_data(path: str) -> list:
    """--sft_data: {prompt, completion} records, one JSON object a line (what rejection sampling
    writes). Refused with one line: a missing file, a bad line, a held-out problem."""
    if not os.path.exists(path):
        config_error(f"--sft_data={path!r}: no such file")
    records = []
    for n, line in enumerate(open(path), 1):
        try:
            r = json.loads(line)
            if not (isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)):
                raise ValueError("needs string fields prompt and completion")
        except (ValueError, AttributeError) as e:
            config_error(f"--sft_data={path!r}: line {n}: {_first_line(e)}")
        if is_heldout(r["prompt"].removesuffix("=")):
            config_error(f"--sft_data={path!r}: line {n}: {r['prompt']!r} is a held-out problem")
        records.append(r)
    return records


def student_config(teacher: ModelConfig, dim: int, n_layers: int = 0) -> ModelConfig:
    """The teacher's architecture at width dim: every width (FFNs, experts, MLA latent and head
    dims) scaled by dim / teacher.dim, so the parameters shrink about as its square (dim 64 of 128:
    about a quarter); heads, experts and routing are kept. n_layers 0 keeps the depth."""
    s = dim / teacher.dim
    w = lambda x: max(1, round(x * s))
    layers = n_layers or teacher.n_layers
    return dataclasses.replace(teacher, dim=dim, inter_dim=w(teacher.inter_dim), moe_inter_dim=w(teacher.moe_inter_dim),
                               q_lora_rank=round(teacher.q_lora_rank * s), kv_lora_rank=w(teacher.kv_lora_rank),
                               qk_nope_head_dim=w(teacher.qk_nope_head_dim), v_head_dim=w(teacher.v_head_dim),
                               qk_rope_head_dim=2 * max(1, round(teacher.qk_rope_head_dim * s / 2)),  # even
                               n_layers=layers, n_dense_layers=min(teacher.n_dense_layers, layers))


def stage_cfg(cfg: Config, *parts, **changes) -> Config:
    """The run's settings with changes, writing checkpoints and metrics into out_dir/parts/."""
    out = os.path.join(cfg.out_dir, *parts)
    os.makedirs(out, exist_ok=True)
    return dataclasses.replace(cfg, out_dir=out, **changes)


def finish_stage(cfg: Config, name: str, seconds: float, model, tests: dict, device, save: bool = True, **extra):
    """Save the stage's model as cfg.out_dir/model.pt, measure it on the held-out set -> its record
    for the summary (wall seconds: the stage's work, this evaluation not counted)."""
    if save:
        save_checkpoint(os.path.join(cfg.out_dir, "model.pt"), model, cfg, stage=name)
    res = evaluate(model, tests, cfg, device)
    print0(f"{name} ({fmt_time(seconds)}): held-out (greedy, {cfg.n_test}/level): " + levels_line(res))
    return {"name": name, "wall_seconds": seconds, "heldout": levels_summary(res), **extra}


def load_stage_model(cfg: Config, device, default: str):
    path = cfg.init_from or os.path.join(cfg.out_dir, default)
    model, _ = load_checkpoint(path, device)
    print0(f"loaded {path} ({model.num_params() / 1e6:.2f}M params)")
    return model, path


def run_sft(cfg: Config, device, tests: dict):
    """--stage sft: fine-tune --init_from (default out_dir/base.pt) on --sft_data, or on cold_start
    worked solutions -> out_dir/sft/model.pt."""
    model, _ = load_stage_model(cfg, device, "base.pt")
    sub = stage_cfg(cfg, "sft")
    t0 = time.time()
    if cfg.sft_data:
        records = read_sft_data(cfg.sft_data)
    else:
        records = worked_solutions(cfg.cold_start, cfg.seed)
        write_jsonl(os.path.join(sub.out_dir, "cold_start.jsonl"), records)
    fine_tune(sub, model, records, device, "sft")
    rec = finish_stage(sub, "sft", time.time() - t0, model, tests, device, examples=len(records))
    return [rec], {}


def run_rejection(cfg: Config, device, tests: dict):
    """--stage rejection: rs_samples completions for each of rs_prompts fresh training problems from
    --init_from (default out_dir/final.pt) -> out_dir/rejection/traces.jsonl (for --sft_data)."""
    model, _ = load_stage_model(cfg, device, "final.pt")
    sub = stage_cfg(cfg, "rejection")
    t0 = time.time()
    traces = rejection_sample(cfg, model, fresh_problems(cfg, "rejection", cfg.rs_prompts), cfg.rs_samples, device,
                              cfg.seed, os.path.join(sub.out_dir, "traces.jsonl"))
    rec = finish_stage(sub, "rejection", time.time() - t0, model, tests, device, save=False,
                       samples=cfg.rs_prompts * cfg.rs_samples, kept=len(traces))
    return [rec], {}


def run_r1(cfg: Config, device, tests: dict):
    """--stage r1: DeepSeek-R1's four stages from the pretrained base (--init_from, default
    out_dir/base.pt), each in out_dir/r1/<stage>/; each RL stage runs r1_grpo_steps GRPO steps."""
    base, _ = load_stage_model(cfg, device, "base.pt")
    stages = []
    # 1) cold start: SFT on worked solutions, so that RL starts from a model that already thinks
    sub, t0 = stage_cfg(cfg, "r1", "cold_start_sft"), time.time()
    model, records = copy.deepcopy(base), worked_solutions(cfg.cold_start, cfg.seed)
    write_jsonl(os.path.join(sub.out_dir, "cold_start.jsonl"), records)
    fine_tune(sub, model, records, device, "cold_start_sft")
    stages.append(finish_stage(sub, "cold_start_sft", time.time() - t0, model, tests, device, examples=len(records)))
    # 2) and 4) RL: GRPO against the frozen stage's starting model, as in R1-Zero
    def rl(name, model):
        sub, t0 = stage_cfg(cfg, "r1", name, grpo_steps=cfg.r1_grpo_steps), time.time()
        grpo(sub, model, copy.deepcopy(model), device, 0, 1, tests, [])
        stages.append(finish_stage(sub, name, time.time() - t0, model, tests, device, steps=cfg.r1_grpo_steps))
    rl("reasoning_rl", model)
    # 3) rejection sampling from the RL model; SFT of the base on the traces (R1 fine-tunes V3-Base)
    sub, t0 = stage_cfg(cfg, "r1", "rejection_sft"), time.time()
    traces = rejection_sample(cfg, model, fresh_problems(cfg, "r1-rejection", cfg.rs_prompts), cfg.rs_samples,
                              device, cfg.seed, os.path.join(sub.out_dir, "traces.jsonl"))
    model = copy.deepcopy(base)
    fine_tune(sub, model, traces, device, "rejection_sft")
    stages.append(finish_stage(sub, "rejection_sft", time.time() - t0, model, tests, device,
                               samples=cfg.rs_prompts * cfg.rs_samples, examples=len(traces)))
    rl("final_rl", model)
    return stages, {}


def run_distill(cfg: Config, device, tests: dict):
    """--stage distill, R1 sec 4.1 in miniature: one small student, from its own pretrained base,
    (a) trained with GRPO, and (b) fine-tuned on the teacher's rejection-sampled traces, at equal
    wall time: (a) runs as many GRPO steps as fit in the time (b) took to sample its traces and
    fine-tune (the teacher's own training is not counted, as in the paper). Teacher: --init_from,
    default out_dir/final.pt. Everything is written into out_dir/distill/<stage>/."""
    teacher, teacher_path = load_stage_model(cfg, device, "final.pt")
    torch.manual_seed(cfg.seed)
    base = Transformer(student_config(teacher.cfg, cfg.student_dim, cfg.student_layers)).to(device)
    print0(f"student: {base.num_params() / 1e6:.2f}M params ({base.num_params(active=True) / 1e6:.2f}M active), "
           f"teacher {teacher.num_params() / 1e6:.2f}M")
    stages = []
    # the student's base: pretrain() on the teacher's corpus, for student_pretrain_steps
    sub, t0 = stage_cfg(cfg, "distill", "student_base", pretrain_steps=cfg.student_pretrain_steps), time.time()
    pretrain(sub, base, device, 0, 1, tests)
    stages.append(finish_stage(sub, "student_pretrain", time.time() - t0, base, tests, device))
    # (b) distillation: the teacher's traces for fresh training problems, then SFT of the student
    sub, t0 = stage_cfg(cfg, "distill", "teacher_traces"), time.time()
    traces = rejection_sample(cfg, teacher, fresh_problems(cfg, "distill-rejection", cfg.rs_prompts), cfg.rs_samples,
                              device, cfg.seed, os.path.join(sub.out_dir, "traces.jsonl"))
    t_traces = time.time() - t0
    stages.append(finish_stage(sub, "teacher_traces", t_traces, teacher, tests, device, save=False,
                               samples=cfg.rs_prompts * cfg.rs_samples, kept=len(traces)))
    sub, t0 = stage_cfg(cfg, "distill", "student_distilled"), time.time()
    distilled = fine_tune(sub, copy.deepcopy(base), traces, device, "student_sft")
    t_sft = time.time() - t0
    stages.append(finish_stage(sub, "student_sft", t_sft, distilled, tests, device, examples=len(traces)))
    # (a) RL alone, from the same base, for the same wall time (no evaluations inside it)
    budget = 0 if cfg.student_grpo_steps else t_traces + t_sft
    sub = stage_cfg(cfg, "distill", "student_rl", grpo_steps=cfg.student_grpo_steps or 100_000,  # the budget stops it
                    grpo_eval_every=0)
    rl, history = copy.deepcopy(base), []
    grpo(sub, rl, copy.deepcopy(base), device, 0, 1, tests, history, max_seconds=budget)
    t_rl = sum(h["t_gen"] + h["t_update"] for h in history)                  # its steps' own time
    stages.append(finish_stage(sub, "student_grpo", t_rl, rl, tests, device, steps=len(history)))
    by_name = {s["name"]: s for s in stages}
    result = {"student_rl": by_name["student_grpo"]["heldout"], "student_distilled": by_name["student_sft"]["heldout"],
              "teacher": by_name["teacher_traces"]["heldout"], "student_base": by_name["student_pretrain"]["heldout"],
              "student_params": base.num_params(), "teacher_params": teacher.num_params(),
              "student_rl_seconds": t_rl, "student_rl_steps": len(history),
              "student_distilled_seconds": t_traces + t_sft, "traces": len(traces), "teacher_checkpoint": teacher_path}
    acc = lambda levels: levels["overall"]["accuracy"]
    print0(f"\nstudent ({result['student_params'] / 1e6:.2f}M params, teacher {result['teacher_params'] / 1e6:.2f}M), "
           f"held-out accuracy: base {acc(result['student_base']):.2f} | RL {acc(result['student_rl']):.2f} "
           f"({len(history)} GRPO steps, {fmt_time(t_rl)}) | distilled {acc(result['student_distilled']):.2f} "
           f"({len(traces)} traces, {fmt_time(t_traces + t_sft)}) | teacher {acc(result['teacher']):.2f}")
    return stages, {"distill": result}


# -----------------------------------------------------------------------------
# Plots and summary

def make_plots(cfg: Config, base: dict, final: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    recs = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    pre = [r for r in recs if r["stage"] == "pretrain"]
    rl = [r for r in recs if r["stage"] == "grpo"]
    ev = [r for r in rl if "heldout" in r]
    fig, ax = plt.subplots(2, 3, figsize=(16, 8.5))
    ax = ax.flatten()
    if pre:
        ax[0].plot([r["step"] for r in pre], [r["loss"] for r in pre])
        ax[0].set(title="pretraining loss", xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log")
    if rl:
        steps = [r["step"] for r in rl]
        smooth = lambda xs, k=10: [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]
        ax[1].plot(steps, smooth([r["reward"] for r in rl]), label="train reward")
        ax[1].plot(steps, smooth([r["acc"] for r in rl]), label="train accuracy")
        # held-out greedy evaluations, the base model's at GRPO step 0
        ev_steps = [0] + [r["step"] for r in ev]
        ev_res = [base] + [r["heldout"] for r in ev]
        ax[1].plot(ev_steps, [r["overall"]["accuracy"] for r in ev_res], "o-", label="held-out accuracy (greedy)")
        ax[1].set(title="GRPO: reward and accuracy", xlabel="GRPO step", ylim=(0, 1.25))
        ax[1].legend()
        ax[2].plot(steps, smooth([r["length"] for r in rl]), color="C3", label="mean response length")
        ax[2].set(title="R1-Zero signature: responses grow (samples)", xlabel="GRPO step", ylabel="tokens")
        tw = ax[2].twinx()
        tw.plot(steps, smooth([r["think"] for r in rl]), color="C2", label="think rate")
        tw.set(ylabel="share of samples that think", ylim=(0, 1.05))
        ax[2].legend(loc="upper left")
        tw.legend(loc="lower right")
        ax[5].plot(ev_steps, [r["overall"]["mean_length"] for r in ev_res], "o-", color="C3",
                   label="mean response length")
        ax[5].set(title="held-out, greedy: length and think rate", xlabel="GRPO step", ylabel="tokens", ylim=(0, None))
        tw = ax[5].twinx()
        tw.plot(ev_steps, [r["overall"]["think_rate"] for r in ev_res], "s--", color="C2", label="think rate")
        tw.set(ylabel="share of answers that think", ylim=(0, 1.05))
        ax[5].legend(loc="upper left")
        tw.legend(loc="lower right")
    lv = [k for k in base if k != "overall"] + ["overall"]
    xs = range(len(lv))
    ax[3].bar([x - 0.2 for x in xs], [base[k]["accuracy"] for k in lv], 0.4, label="base (before GRPO)")
    if final:
        ax[3].bar([x + 0.2 for x in xs], [final[k]["accuracy"] for k in lv], 0.4, label="after GRPO")
    ax[3].set(title="held-out greedy accuracy per level", xticks=list(xs), xticklabels=lv, ylim=(0, 1.05))
    ax[3].legend()
    # expert load over the whole run: pretraining steps, then GRPO steps after them
    rs = [r for r in pre + rl if r.get("expert_load")]
    if rs:
        offset = pre[-1]["step"] if pre else 0
        x = [r["step"] + (offset if r["stage"] == "grpo" else 0) for r in rs]
        loads = torch.tensor([r["expert_load"] for r in rs])                 # (records, layers, E)
        share = loads / loads.sum(-1, keepdim=True).clamp_min(1)
        for layer in range(share.size(1)):
            ax[4].plot(x, (share[:, layer].max(-1).values * share.size(-1)).tolist(), label=f"MoE layer {layer}")
        ax[4].axhline(1.0, color="gray", ls="--")
        if pre and rl:
            ax[4].axvline(pre[-1]["step"], color="k", ls=":", label="GRPO starts")
        ax[4].set(title="expert load balance (busiest expert / mean)", xlabel="training step", ylabel="max load / mean load")
        ax[4].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "nanor1.png"), dpi=110)
    plt.close(fig)


def summary_table(base: dict, final: dict) -> str:
    lines = [f"{'level':<8} {'acc base':>9} {'acc final':>9} {'think base':>10} {'think final':>11} "
             f"{'len base':>8} {'len final':>9}"]
    for k in base:
        b, f = base[k], final.get(k, {}) if final else {}
        g = lambda d, key, spec: format(d[key], spec) if key in d else "-"
        lines.append(f"{k:<8} {g(b, 'accuracy', '9.2f')} {g(f, 'accuracy', '9.2f')} {g(b, 'think_rate', '10.2f')} "
                     f"{g(f, 'think_rate', '11.2f')} {g(b, 'mean_length', '8.1f')} {g(f, 'mean_length', '9.1f')}")
    return "\n".join(lines)


def levels_summary(res: dict) -> dict:
    return {k: {"accuracy": v["accuracy"], "think_rate": v["think_rate"], "mean_length": v["mean_length"]}
            for k, v in res.items()}


def stages_table(stages: list) -> str:
    """Held-out greedy accuracy per level after each stage, then think rate and length overall."""
    levels = list(stages[0]["heldout"])
    lines = [f"{'stage':<17} {'wall':>6} " + " ".join(f"{k:>7}" for k in levels) + f" {'think':>6} {'len':>6}"]
    for s in stages:
        h = s["heldout"]
        lines.append(f"{s['name']:<17} {fmt_time(s['wall_seconds']):>6} " +
                     " ".join(f"{h[k]['accuracy']:7.2f}" for k in levels) +
                     f" {h['overall']['think_rate']:6.2f} {h['overall']['mean_length']:6.1f}")
    return "\n".join(lines)


def merge_summary(cfg: Config, pipeline: str, stages: list, **extra):
    """Merge an R1-recipe stage's results into out_dir/summary.json, keeping what other runs wrote
    there (the R1-Zero run's base and final, other stages'): its stages replace its earlier ones."""
    path = os.path.join(cfg.out_dir, "summary.json")
    summary = {}
    if os.path.exists(path):
        with contextlib.suppress(ValueError, OSError):
            summary = json.load(open(path))
        if not isinstance(summary, dict) or not isinstance(summary.get("stages", []), list):
            print0(f"warning: {path} is not a nanor1 summary; writing a new one")
            summary = {}
    stages = [{"name": s["name"], "pipeline": pipeline, **s} for s in stages]
    summary["stages"] = [s for s in summary.get("stages", []) if s.get("pipeline") != pipeline] + stages
    summary.update(extra)
    with open(f"{path}.tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(f"{path}.tmp", path)


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    RUN["argv"] = None if cfg.stage in RECIPE_STAGES else argv if cfg.resume else argv + ["--resume"]
    rank, world, device = setup(cfg)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, f".write-test-{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        config_error(f"--out_dir={cfg.out_dir!r}: must be a writable directory ({e.strerror or e})")
    # --resume: read and check the checkpoint before anything runs or is written
    resume = read_resume_checkpoint(cfg, device) if cfg.resume else None
    resume_grpo = resume is not None and resume["stage"] == "grpo"
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tests = test_set(cfg.n_test)
    ctx = autocast(cfg, device)
    wall, t0 = {}, time.time()
    if cfg.stage in RECIPE_STAGES:   # the rest of the R1 recipe, in one process (see validate)
        print0(f"nanor1 | stage {cfg.stage} | device {device} | seed {cfg.seed} | out {cfg.out_dir}/{cfg.stage}/")
        run = {"sft": run_sft, "rejection": run_rejection, "distill": run_distill, "r1": run_r1}[cfg.stage]
        stages, extra = run(cfg, device, tests)
        merge_summary(cfg, cfg.stage, stages, **extra)
        print0("\n" + stages_table(stages))
        print0(f"\nwall time {fmt_time(time.time() - t0)} | wrote {cfg.out_dir}/{cfg.stage}/, "
               f"{cfg.out_dir}/summary.json")
        return
    if rank == 0 and resume:
        truncate_metrics(cfg, resume["stage"], resume["step"])
    elif rank == 0 and cfg.stage in ("all", "pretrain") and os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl")):
        os.remove(os.path.join(cfg.out_dir, "metrics.jsonl"))
    elif rank == 0 and cfg.stage == "grpo":
        truncate_metrics(cfg, "grpo", 0)   # keep the pretraining log, drop an earlier GRPO run's
    print0(f"nanor1 | device {device} | world {world} | seed {cfg.seed} | out {cfg.out_dir}/")

    if cfg.stage in ("all", "pretrain") and not resume_grpo:
        model = Transformer(dataclasses.replace(cfg.model, vocab_size=enc.n_vocab)).to(device)
        if resume:
            model.load_state_dict(resume["model"])
        pretrain(cfg, model, device, rank, world, tests, resume=resume)
        wall["pretrain"] = time.time() - t0
        if rank == 0:
            save_checkpoint(os.path.join(cfg.out_dir, "base.pt"), model, cfg, stage="pretrain", step=cfg.pretrain_steps)
    else:
        path = cfg.init_from or os.path.join(cfg.out_dir, "final.pt" if cfg.stage == "eval" else "base.pt")
        model, _ = load_checkpoint(path, device)
        print0(f"loaded {path}")
        if resume_grpo and dataclasses.asdict(model.cfg) != resume["model_config"]:
            config_error(f"cannot resume: {path} (the GRPO reference) holds another model than {cfg.out_dir}/ckpt.pt")

    base = evaluate(model, tests, cfg, device)
    print0(f"held-out (greedy, {cfg.n_test}/level) before GRPO: " + levels_line(base))
    sampled = evaluate(model, subset(tests, 100), cfg, device, greedy=False, seed=cfg.seed)
    print0(f"held-out (sampled T={cfg.temperature}, 100/level):  " + levels_line(sampled))
    forced = {f: evaluate(model, subset(tests, 100), cfg, device, force=f) for f in ("think", "answer")}
    print0("held-out (greedy, 100/level) forced to think:    " + levels_line(forced["think"]))
    print0("held-out (greedy, 100/level) forced to answer:   " + levels_line(forced["answer"]))
    final = None
    if cfg.stage in ("all", "grpo"):
        t1 = time.time()
        ref, _ = (Transformer(model.cfg).to(device), None)
        ref.load_state_dict(model.state_dict())
        if resume_grpo:
            model.load_state_dict(resume["model"])
        history = []
        grpo(cfg, model, ref, device, rank, world, tests, history, resume=resume if resume_grpo else None)
        wall["grpo"] = time.time() - t1
        if rank == 0:
            save_checkpoint(os.path.join(cfg.out_dir, "final.pt"), model, cfg, stage="grpo", step=cfg.grpo_steps)
        final = evaluate(model, tests, cfg, device)
        print0(f"held-out (greedy, {cfg.n_test}/level) after GRPO:  " + levels_line(final))
    wall["total"] = time.time() - t0
    if rank == 0:
        summary = {"seed": cfg.seed, "wall_seconds": wall, "base": levels_summary(base),
                   "base_sampled": levels_summary(sampled), "base_forced_think": levels_summary(forced["think"]),
                   "base_forced_answer": levels_summary(forced["answer"])}
        if final:
            summary["final"] = levels_summary(final)
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        make_plots(cfg, base, final)
        print0("\n" + summary_table(base, final or {}))
        print0(f"\nwall time: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in wall.items()) +
               f" | wrote {cfg.out_dir}/summary.json, {cfg.out_dir}/nanor1.png")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):   # stop safely: see "Stopping safely" above
        signal.signal(sig, _on_signal)
    main()
