"""
plumbing.py -- the machinery around nanor1. Nothing in this file is R1: start with nanor1.py.

What lives here, so that nanor1.py can read as the method alone:
  * flags: the Config dataclass -> argparse, validation with one-line errors;
  * torchrun: process group, print0, all-reduce, DDP wrapping and the GRPO loss shares;
  * checkpoints: atomic save, read with clear errors, resume checks, the metrics log, and the
    export as a HuggingFace DeepseekV3ForCausalLM (--stage export);
  * --stage sample's problems, from --prompt flags or standard input;
  * stopping safely: Ctrl-C / SIGTERM finish the step and save; a kill loses at most ckpt_every
    steps;
  * progress lines with an ETA, and MFU against a peak FLOP/s.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist

from data import EDGE_LEVEL, LEVELS, parse_problem
from moe import ModelConfig, Transformer

RECIPE_STAGES = ("sft", "rejection", "distill", "r1")   # the rest of the R1 recipe (see nanor1.py)
MODEL_STAGES = ("export", "sample")   # the trained model, outside training: export it, ask it
MAX_PROMPT_TOKENS = 32   # room a rollout leaves for its prompt; "(99+99)*9-99=" is 14 tokens


# -----------------------------------------------------------------------------
# Flags: every field of nanor1.Config and moe.ModelConfig is a --flag, its comment the help line

def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _field_help(cls):
    """The comment after each field in the dataclass source, used as its --help line."""
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


def parse_args(config_cls, argv=None):
    """Flags -> config_cls (nanor1.Config). A bad flag or value ends here with one line on stderr
    and exit code 2."""
    p = _Parser(description="nanor1: DeepSeek-R1-Zero in miniature", allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = ((config_cls, "run / data / training"), (ModelConfig, "model (moe.ModelConfig)"))
    for cls, group in groups:
        g, helps = p.add_argument_group(group), _field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("model", "vocab_size"):
                continue
            if f.default_factory is list:   # a list (--prompt): the flag repeated, one value each
                g.add_argument(f"--{f.name}", action="append", default=[], metavar="STR",
                               help=helps.get(f.name, f.name))
                continue
            default = f.default
            is_bool = isinstance(default, bool)   # a bare --resume means --resume true
            flag = dict(type=_str2bool, nargs="?", const=True) if is_bool else \
                dict(type=type(default))
            g.add_argument(f"--{f.name}", **flag, default=default, help=helps.get(f.name, f.name),
                           metavar=type(default).__name__.upper())
    a = vars(p.parse_args(argv))
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = config_cls(**{k: v for k, v in a.items() if k not in model_keys},
                         model=ModelConfig(**{k: v for k, v in a.items() if k in model_keys}))
        validate(cfg)
    except ValueError as e:
        p.error(str(e).replace("ModelConfig.", "--"))   # ModelConfig's fields are flags too
    return cfg


def level_weights(cfg) -> list:
    """--level_weights "1,1,1,2" -> [1.0, 1.0, 1.0, 2.0], one per level of LEVELS."""
    try:
        w = [float(x) for x in cfg.level_weights.split(",")]
    except ValueError:
        w = []
    if len(w) != len(LEVELS) or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--level_weights={cfg.level_weights!r}: must be {len(LEVELS)} comma-"
                         f"separated numbers >= 0, not all 0 (one per level: {','.join(LEVELS)})")
    return w


def run_levels(cfg) -> tuple:
    """The levels a run trains and tests on, and their pretraining weights: R1-Zero's four, and the
    edge level after them when --edge_weight > 0."""
    levels, weights = list(LEVELS), level_weights(cfg)
    if cfg.edge_weight > 0:
        levels, weights = levels + [EDGE_LEVEL], weights + [cfg.edge_weight]
    return levels, weights


def validate_model(m: ModelConfig):
    """A model setting that cannot build a model -> ValueError("ModelConfig.field=value: rule")."""
    def need(ok, field, rule):
        if not ok:
            raise ValueError(f"ModelConfig.{field}={getattr(m, field)!r}: {rule}")
    for f in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
              "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len"):
        need(getattr(m, f) > 0, f, "must be > 0")
    need(0 <= m.n_dense_layers <= m.n_layers, "n_dense_layers", "must be in [0, n_layers]")
    need(m.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
    need(m.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 means a plain wq)")
    need(m.score_func in ("softmax", "sigmoid"), "score_func", "must be 'softmax' or 'sigmoid'")
    need(m.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rope rotates pairs)")
    need(m.n_routed_experts % m.n_expert_groups == 0, "n_expert_groups",
         f"must divide n_routed_experts={m.n_routed_experts}")
    need(m.n_limited_groups <= m.n_expert_groups, "n_limited_groups",
         f"must be <= n_expert_groups={m.n_expert_groups}")
    per_group = m.n_routed_experts // m.n_expert_groups
    need(m.n_expert_groups == 1 or per_group >= 2, "n_expert_groups",
         "needs >= 2 experts per group (group score = sum of the top-2)")
    need(m.n_activated_experts <= m.n_limited_groups * per_group, "n_activated_experts",
         f"must be <= the experts in the kept groups ({m.n_limited_groups * per_group})")
    need(m.route_scale > 0, "route_scale", "must be > 0")
    need(m.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
    need(m.seq_aux_alpha >= 0, "seq_aux_alpha", "must be >= 0")


def accum_steps(cfg, world: int) -> int:
    """Micro-steps per rank: --grad_accum shared among the ranks (rounded up, so that no rank's
    micro-batch is larger than one process's), keeping the global batch fixed."""
    return -(-cfg.grad_accum // world)


POSITIVE = ("batch_size", "block_size", "grad_accum", "prompts_per_step", "max_new_tokens", "mu",
            "n_test", "grpo_eval_n", "eval_batch", "log_every",
            "sft_epochs", "sft_batch", "rs_samples", "student_dim")
NON_NEGATIVE = ("pretrain_steps", "grpo_steps", "warmup_steps", "eval_every", "grpo_eval_every",
                "top_k", "threads", "beta", "weight_decay", "ckpt_every", "grpo_ckpt_every",
                "cold_start", "rs_prompts", "r1_grpo_steps", "student_layers",
                "student_pretrain_steps", "student_grpo_steps", "num_samples")


def validate(cfg):
    """Every setting that cannot work -> ValueError("--flag=value: rule"), before anything runs."""
    validate_model(cfg.model)

    def need(ok, name, rule):
        if not ok:
            raise ValueError(f"--{name}={getattr(cfg, name)!r}: {rule}")
    need(cfg.stage in ("all", "pretrain", "grpo", "eval") + RECIPE_STAGES + MODEL_STAGES, "stage",
         "must be all, pretrain, grpo or eval (R1-Zero), sft, rejection, distill or r1 (the R1 "
         "recipe), or export or sample (the trained model)")
    need(not cfg.prompt or cfg.stage == "sample", "prompt", "is for --stage sample")
    need(cfg.agg in ("seq", "token", "constant"), "agg", "must be seq, token or constant")
    need(cfg.optimizer in ("muon", "adamw"), "optimizer", "must be muon or adamw")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be auto, float32 or bfloat16")
    need(0.0 <= cfg.think_frac <= 1.0, "think_frac", "must be in [0, 1]")
    level_weights(cfg)
    need(cfg.edge_weight >= 0 and math.isfinite(cfg.edge_weight), "edge_weight", "must be >= 0")
    for name in ("verify_frac", "retry_frac"):
        need(0.0 <= getattr(cfg, name) <= 1.0, name, "must be in [0, 1]")
    need(cfg.verify_frac + cfg.retry_frac <= 1.0, "retry_frac",
         f"plus --verify_frac={cfg.verify_frac} must be <= 1 (shares of the worked solutions)")
    need(cfg.block_size >= 256 or not (cfg.verify_frac or cfg.retry_frac), "block_size",
         "must be >= 256 with reflective worked solutions (up to ~235 tokens; bash aha.sh)")
    for name in POSITIVE:
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in NON_NEGATIVE:
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    for f in dataclasses.fields(cfg.model):
        value = getattr(cfg.model, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name}={value!r}: must be a finite number")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f.name,
             "must be a finite number")
    need(cfg.group_size >= 2, "group_size",
         "must be >= 2 (advantages compare completions of a prompt)")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.embed_lr_mult > 0, "embed_lr_mult", "must be > 0")
    need(0 <= cfg.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
    need(cfg.grpo_head_lr_mult > 0, "grpo_head_lr_mult", "must be > 0")
    need(cfg.grpo_lr > 0, "grpo_lr", "must be > 0")
    need(cfg.grad_clip > 0, "grad_clip",
         "must be > 0 (the gradient norm is clipped to it; 0 would zero it)")
    need(cfg.temperature > 0, "temperature", "must be > 0")
    need(0 <= cfg.clip_low < 1 and cfg.clip_high >= 0, "clip_low",
         "need 0 <= clip_low < 1 and clip_high >= 0")
    need(0 <= cfg.min_lr_frac <= 1, "min_lr_frac", "must be in [0, 1]")
    need(0 <= cfg.decay_frac <= 1, "decay_frac", "must be in [0, 1]")
    max_len = cfg.model.max_seq_len
    need(cfg.block_size <= max_len, "block_size", f"must be <= --max_seq_len={max_len}")
    need(cfg.max_new_tokens + MAX_PROMPT_TOKENS <= max_len, "max_new_tokens",
         f"must be <= --max_seq_len={max_len} - {MAX_PROMPT_TOKENS} (room for the prompt)")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device), "device",
         "must be auto, cpu, cuda or cuda:N")
    need(not cfg.device.startswith("cuda") or torch.cuda.is_available(), "device",
         "CUDA is not available here")
    need(not (cfg.resume and cfg.stage not in ("all", "pretrain", "grpo")), "resume",
         "only a training stage (all, pretrain, grpo) resumes; eval and the R1-recipe stages run "
         "again from the start")
    need(cfg.sft_lr > 0, "sft_lr", "must be > 0")
    world = int(os.environ.get("WORLD_SIZE", 1))   # processes started by torchrun (1 without it)
    accum = accum_steps(cfg, world)
    need(cfg.batch_size % (accum * world) == 0, "batch_size",
         f"the global batch must split into {world} ranks x {accum} micro-steps")
    need(cfg.prompts_per_step % world == 0, "prompts_per_step",
         f"must be divisible by the world size {world}")
    need(world == 1 or cfg.stage not in RECIPE_STAGES + MODEL_STAGES, "stage",
         f"{cfg.stage} runs in one process (the R1-recipe stages, export and sample do not shard "
         f"over torchrun's ranks)")


def config_error(message: str):
    """A setting that cannot work: one line on stderr and exit code 2, like a bad flag."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def first_line(e: Exception) -> str:
    why = (str(e).strip().splitlines() or [""])[0][:200]
    return type(e).__name__ + (f": {why}" if why else "")


def prepare_out_dir(cfg, rank: int):
    """out_dir must exist and be writable before any work is done (one line and exit 2 if not)."""
    writable_dir(cfg.out_dir, f"--out_dir={cfg.out_dir!r}", rank)


def writable_dir(path: str, what: str, rank: int = 0):
    """Make the directory path if need be and write a file in it, or stop with one line naming
    it as `what` (exit 2)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        config_error(f"{what}: must be a writable directory ({e.strerror or e})")


# -----------------------------------------------------------------------------
# torchrun: process group, rank 0's prints, all-reduce, DDP

def setup(cfg):
    """Returns (rank, world, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process
    it starts: then join the process group (nccl on CUDA, one GPU per process: cuda:LOCAL_RANK;
    gloo on CPU). A plain `python nanor1.py` is a world of one and touches nothing distributed."""
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


def teardown():
    """Leave the process group together, once rank 0 has written its files."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*args, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kw, flush=True)


def autocast(cfg, device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def through_first(tokens: torch.Tensor, eot: int) -> torch.Tensor:
    """(B, L) -> bool (B, L): True up to and including each row's first eot (all True without)."""
    is_eot = (tokens == eot).int()
    return (is_eot.cumsum(1) - is_eot) == 0


def response_lengths(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Tokens of each response (mask: 1 up to its first end-of-text), that end-of-text not
    counted (a truncated response has none)."""
    return mask.sum(1) - (~truncated).long()


def pad_left(seqs: list, pad: int, device):
    """Token lists -> tokens (B, P) left-padded with pad, key_mask (B, P) False on the padding."""
    P = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), P), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, P - len(s):] = torch.tensor(s)
        mask[i, P - len(s):] = True
    return tokens.to(device), mask.to(device)


def pack_sequences(tokens, key_mask, P: int, comp_mask):
    """GRPO's batch without its padding, for sequence_logprobs. tokens (B, P + L): prompts
    left-padded (key_mask False on the padding), completions after them, each up to its end where
    comp_mask (B, L) is True. -> x (R, W): rows of whole sequences (prompt, then completion but its
    last token, which predicts nothing), placed first fit by decreasing length, W the longest;
    doc_ids (R, W): attention stays inside a sequence (the padding has an id of its own); at (B, L):
    the flat position in x whose prediction is completion token t of sequence i (0 past its end);
    valid (B, L) = comp_mask."""
    B, L = comp_mask.shape
    starts = (P - key_mask[:, :P].sum(1)).tolist()            # each prompt's first token
    ends = (P + comp_mask.sum(1)).tolist()                    # one past its completion's end
    lens = [e - 1 - s for s, e in zip(starts, ends)]
    W, fill, place = max(lens), [], [None] * B
    for i in sorted(range(B), key=lambda i: -lens[i]):
        r = next((r for r, used in enumerate(fill) if used + lens[i] <= W), len(fill))
        if r == len(fill):
            fill.append(0)
        place[i], fill[r] = (r, fill[r]), fill[r] + lens[i]
    x = torch.zeros(len(fill), W, dtype=tokens.dtype, device=tokens.device)
    doc_ids = torch.full_like(x, B)
    at = torch.zeros(B, L, dtype=torch.long)
    for i, ((r, off), s, n) in enumerate(zip(place, starts, lens)):
        x[r, off:off + n] = tokens[i, s:s + n]
        doc_ids[r, off:off + n] = i
        first = r * W + off + (P - s) - 1          # the input position that predicts tokens[i, P]
        c = ends[i] - P
        at[i, :c] = torch.arange(first, first + c)
    return x, doc_ids, at.to(tokens.device), comp_mask.bool()


def epoch_batches(examples: list, size: int, rng, name: str):
    """Endless batches of size examples for fine-tuning stage name, epoch after epoch, each epoch
    in a fresh shuffle (an epoch's tail opens the next batch, which the next epoch fills up)."""
    if not examples:
        raise SystemExit(f"error: {name}: no examples to fine-tune on (rejection sampling kept "
                         f"none?)")

    def batches(order):
        while True:
            while len(order) < size:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                order += perm
            yield [examples[i] for i in order[:size]]
            order = order[size:]
    return batches([])


def sft_rows(examples: list, pad: int):
    """SFT's batch: (prompt tokens, completion tokens) pairs -> x, y (B, T): prompt + completion,
    right-padded with pad (causal: it changes nothing before it); y[t] is the next token where it
    is part of the completion, its final end-of-text included (to learn to stop), -1 elsewhere
    (the prompt is context)."""
    T = max(len(p) + len(c) for p, c in examples) - 1
    x = torch.full((len(examples), T), pad, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        seq = torch.tensor(p + c)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]                     # targets of the completion
    return x, y


UNLEARNED = 1 << 20   # a document token t + UNLEARNED: the input t, never a target (pack_rows)


def mark_unlearned(doc: list, spans: list, at: int) -> list:
    """doc with the tokens of each (start, end) span, counted from position at, marked UNLEARNED."""
    for a, b in spans:
        doc[at + a:at + b] = [t + UNLEARNED for t in doc[at + a:at + b]]
    return doc


def pack_rows(docs, queue: list, rows: int, block_size: int, eot: int):
    """Pack documents (token lists from the iterator docs) into `rows` rows of block_size + 1
    tokens -> x, y (rows, block_size): inputs and next-token targets, -1 on the padding and on
    tokens marked UNLEARNED. A row is eot, then whole documents, never split, taken first fit
    from the queue (kept at 16 documents, and kept by the caller for the next batch), so every
    document is used and the padded tail of a row is short."""
    T, xs, ys = block_size + 1, [], []
    for _ in range(rows):
        row = [eot]
        while True:
            while len(queue) < 16:
                doc = next(docs)
                if len(doc) + 1 > T:
                    raise SystemExit(f"error: --block_size={block_size} is shorter than a "
                                     f"document ({len(doc) + 1} tokens)")
                queue.append(doc)
            fit = next((i for i, d in enumerate(queue) if len(row) + len(d) <= T), None)
            if fit is None:
                break
            row += queue.pop(fit)
        xs.append([t % UNLEARNED for t in row[:-1]] + [eot] * (T - len(row)))
        ys.append([-1 if t >= UNLEARNED else t for t in row[1:]] + [-1] * (T - len(row)))
    return torch.tensor(xs), torch.tensor(ys)


# -----------------------------------------------------------------------------
# Sampling a token (the rollouts' sampler, nanor1.generate)

def sample(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B, V): the first whose cumulative probability exceeds u * total,
    with u uniform in [0, 1). Exact, and one random number per row where torch.multinomial draws
    V of them (the largest cost of a decoding step after the model itself on a CPU)."""
    cdf = probs.double().cumsum(-1)                                     # fp64: u * total < total
    if not torch.isfinite(cdf[:, -1]).all():
        raise SystemExit("error: cannot sample: the model's probabilities are NaN or infinite "
                         "(non-finite weights?)")
    u = torch.rand(probs.size(0), 1, dtype=torch.float64, device=probs.device, generator=generator)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp_(max=probs.size(-1) - 1).squeeze(1)


# -----------------------------------------------------------------------------
# Across ranks

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over the ranks in place (a world of one: t as it is).

    gloo's worker thread often still holds t when all_reduce returns, and takes the GIL to let go
    of it. Had the interpreter of this rank begun to shut down by then (rank 1 exits right after
    its last all_reduce), Python would kill that thread inside a C++ destructor: "terminate called
    without an active exception", SIGABRT, about 1 torchrun run in 7. So wait (about 0.1 ms, at
    most 1 s) until it has let go: t's Python refcount is back to what it was."""
    if dist.is_initialized():
        refs = sys.getrefcount(t)
        dist.all_reduce(t)
        deadline = time.time() + 1.0
        while dist.get_backend() == "gloo" and sys.getrefcount(t) > refs and time.time() < deadline:
            time.sleep(1e-4)
    return t


def wrap_ddp(model, device):
    """DistributedDataParallel under torchrun (the model itself otherwise): backward averages the
    gradients over the ranks.

    MoE: an expert that received no tokens on this rank takes no part in its backward, and plain
    DDP then waits for that gradient forever ("Expected to have finished reduction in the prior
    iteration"). find_unused_parameters=True makes DDP walk the autograd graph after each forward
    and count such parameters as zero from this rank, so the average is exactly one process's
    gradient over the same global batch, and an expert idle on every rank keeps grad None and is
    skipped by AdamW, as in one process. (The alternative, adding 0 * every expert's output to the
    loss, would hand idle experts zero gradients that AdamW still steps with momentum and weight
    decay, and would put a trick into moe.py.) The graph walk costs little next to the expert loop.

    forward_sync_buffers=False: no buffer needs DDP's broadcast from rank 0 before a forward. The
    router biases stay identical because every rank applies the same update, from the loads summed
    over ranks (Transformer.update_router_biases); the loads (Gate.load) are this rank's own counts
    and must not be replaced by rank 0's (harmless today only because the broadcast comes when they
    are all zero); the rope table is a constant.
    """
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True, forward_sync_buffers=False)


def grad_sync(ddp, last: bool):
    """The context of a micro-step's backward: a DDP model all-reduces its gradients on the last
    micro-step only (no_sync before it); a plain model has nothing to sync."""
    return contextlib.nullcontext() if last or not is_ddp(ddp) else ddp.no_sync()


def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def grpo_rank_shares(keep: torch.Tensor, comp_mask: torch.Tensor, device, world: int):
    """GRPO under DDP: which completions this rank trains on, and its loss scales.

    -> (rows, share_rows, share_tok): rows, the indices of this rank's kept completions (None when
    no rank kept any: then there is no update this step, on every rank alike); share_rows and
    share_tok, this rank's share of the kept rows and tokens of all ranks, relative to an even
    split (1.0 in one process, or when every rank keeps as many). The loss is scaled by it, so
    that DDP's average over ranks is exactly the loss of the whole batch, however unevenly groups
    were dropped (drop_zero_std). A rank all of whose groups were dropped still has to join the
    backward, or DDP waits for it forever: it trains on one row at weight 0 (share_rows 0), which
    the caller runs in eval mode (no router counts, no balance loss)."""
    rows = keep.nonzero().squeeze(1).to(device)
    kept = torch.tensor([len(rows), comp_mask[rows].sum().item()], dtype=torch.float64,
                        device=device)
    kept_all = all_reduce_sum(kept.clone())
    share_rows, share_tok = (world * kept / kept_all.clamp_min(1)).tolist()
    if kept_all[0] == 0:
        return None, share_rows, share_tok
    return (rows if len(rows) else rows.new_zeros(1)), share_rows, share_tok


# -----------------------------------------------------------------------------
# Checkpoints and files: written atomically, read with one clear line when they are broken

@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Write to path.tmp, flush it to disk, then rename it over path, so that a kill at any moment
    leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def write_jsonl(path: str, records: list):
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def save_checkpoint(path, model, cfg, **extra):
    """Atomic (see atomic_write). Plain types only (tensors, numbers, strings, dicts and lists of
    them), so torch.load(weights_only=True) reads it."""
    raw = model.module if hasattr(model, "module") else model
    raw = getattr(raw, "_orig_mod", raw)
    ckpt = {"model": raw.state_dict(), "model_config": dataclasses.asdict(raw.cfg),
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}, **extra}
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def read_checkpoint(path, device) -> dict:
    """torch.load(weights_only=True), with one clear line for a missing, truncated or corrupted
    file."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} not found (run the pretrain stage first, or "
                         f"pass --init_from)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"model", "model_config", "config"} <= ckpt.keys():
            raise ValueError("no model, model_config and config entries")
    except Exception as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: file is truncated, corrupted or "
                         f"not a nanor1 checkpoint ({first_line(e)})")
    return ckpt


def load_checkpoint(path, device):
    """-> (model, checkpoint dict). A clear error for a missing or unreadable file."""
    ckpt = read_checkpoint(path, device)
    try:
        model_cfg = ModelConfig(**ckpt["model_config"])
        validate_model(model_cfg)
        model = Transformer(model_cfg).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # weights of another model, or a config this version does not know
        raise SystemExit(f"error: cannot load checkpoint {path}: weights do not match its config "
                         f"({first_line(e)})")
    return model, ckpt


def trained_levels(run_config: dict) -> list:
    """The levels a run trained on, from its settings (a checkpoint's "config"): its
    --edge_weight says whether the edge level was one."""
    return list(LEVELS) + ([EDGE_LEVEL] if run_config.get("edge_weight", 0) > 0 else [])


def stage_cfg(cfg, *parts, **changes):
    """The run's settings with changes, writing checkpoints and metrics into out_dir/parts/."""
    out = os.path.join(cfg.out_dir, *parts)
    os.makedirs(out, exist_ok=True)
    return dataclasses.replace(cfg, out_dir=out, **changes)


def load_base_model(cfg, device, resume_grpo=None):
    """The model a stage without pretraining starts from: --init_from, or out_dir/final.pt for
    eval and out_dir/base.pt otherwise. resume_grpo: the GRPO checkpoint resumed, which must hold
    the same model (this one is its frozen reference)."""
    default = "final.pt" if cfg.stage == "eval" else "base.pt"
    path = cfg.init_from or os.path.join(cfg.out_dir, default)
    model, _ = load_checkpoint(path, device)
    print0(f"loaded {path}")
    if resume_grpo and dataclasses.asdict(model.cfg) != resume_grpo["model_config"]:
        config_error(f"cannot resume: {path} (the GRPO reference) holds another model than "
                     f"{cfg.out_dir}/ckpt.pt")
    return model


def load_stage_model(cfg, device, default: str):
    """--init_from, or out_dir/default -> (model, its path, the settings of the run that saved
    it)."""
    path = cfg.init_from or os.path.join(cfg.out_dir, default)
    model, ckpt = load_checkpoint(path, device)
    print0(f"loaded {path} ({model.num_params() / 1e6:.2f}M params)")
    return model, path, ckpt["config"]


def read_sft_data(path: str, is_heldout) -> list:
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
            config_error(f"--sft_data={path!r}: line {n}: {first_line(e)}")
        if is_heldout(r["prompt"].removesuffix("=")):
            config_error(f"--sft_data={path!r}: line {n}: {r['prompt']!r} is a held-out problem")
        records.append(r)
    return records


def read_problems(cfg, prompt_tokens, max_seq_len: int) -> list:
    """--stage sample's problems: each --prompt, or else each non-blank line of standard input,
    read by the task (data.parse_problem). Text that is not a problem, or whose prompt_tokens and
    max_new_tokens do not fit in max_seq_len, ends the run with one line naming it (exit 2)."""
    if cfg.prompt:
        texts = [("--prompt", t) for t in cfg.prompt]
    else:
        if sys.stdin is not None and sys.stdin.isatty():
            print("reading problems from standard input, one a line (Ctrl-D ends)", file=sys.stderr)
        stdin = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else None   # bytes: any input
        raw = stdin.read().decode("utf-8", errors="replace") if stdin else ""
        texts = [(f"standard input line {n}", t) for n, t in enumerate(raw.splitlines(), 1)
                 if t.strip()]
        if not texts:
            config_error('no problem to ask: pass --prompt "(47+85)*3-29", or one a line on '
                         'standard input')
    problems = []
    for where, text in texts:
        shown = repr(text if len(text) <= 40 else text[:37] + "...")
        try:
            p = parse_problem(text)
        except ValueError as e:
            config_error(f"{where} {shown}: not a problem of + - * and parentheses over "
                         f"non-negative integers: {e}")
        if len(prompt_tokens(p)) + cfg.max_new_tokens > max_seq_len:
            config_error(f"{where} {shown}: its {len(prompt_tokens(p))} tokens and "
                         f"--max_new_tokens={cfg.max_new_tokens} do not fit in the model's "
                         f"context (max_seq_len {max_seq_len})")
        problems.append(p)
    return problems


def log_metrics(cfg, record: dict):
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def start_metrics(cfg, resume, rank: int):
    """The metrics log of this run: on resume, cut back to the checkpoint; a new pretraining
    starts an empty one; a GRPO stage keeps the pretraining records and drops an old GRPO run's."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank != 0:
        return
    if resume:
        truncate_metrics(cfg, resume["stage"], resume["step"])
    elif cfg.stage in ("all", "pretrain") and os.path.exists(path):
        os.remove(path)
    elif cfg.stage == "grpo":
        truncate_metrics(cfg, "grpo", 0)


def truncate_metrics(cfg, stage: str, step: int):
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
                keep.append(r)
    write_jsonl(path, keep)


# -----------------------------------------------------------------------------
# --stage export: a checkpoint as HuggingFace's DeepseekV3ForCausalLM loads it, under the names of
# the published DeepSeek-V3 checkpoints. transformers is not needed to write it (nor imported);
# tests/test_export.py loads it with transformers and compares the logits with nanor1's.

HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "head.weight": "lm_head.weight"}
HF_LAYER = [   # nanor1 -> DeepSeek-V3, replaced in this order in the name after "layers.{i}."
    ("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
    ("attn.wq.", "self_attn.q_proj."), ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_layernorm."), ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."),
    ("attn.kv_norm.", "self_attn.kv_a_layernorm."), ("attn.wkv_b.", "self_attn.kv_b_proj."),
    ("attn.wo.", "self_attn.o_proj."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.", "mlp."),
    ("w1.", "gate_proj."), ("w3.", "up_proj."), ("w2.", "down_proj.")]


def hf_name(name: str) -> str:
    """A nanor1 state_dict key -> its name in DeepSeek-V3's published checkpoints:
    layers.3.ffn.experts.5.w1.weight -> model.layers.3.mlp.experts.5.gate_proj.weight."""
    if name in HF_TOP:
        return HF_TOP[name]
    _, i, rest = name.split(".", 2)
    for ours, theirs in HF_LAYER:
        rest = rest.replace(ours, theirs)
    return f"model.layers.{i}.{rest}"


def hf_config(m: ModelConfig, eot: int) -> dict:
    """config.json of DeepseekV3ForCausalLM for model config m, with the published checkpoints'
    keys: sigmoid scores with the bias for choosing (noaux_tc), interleaved rope, no MTP layer."""
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.inter_dim,
            "moe_intermediate_size": m.moe_inter_dim, "num_hidden_layers": m.n_layers,
            "first_k_dense_replace": m.n_dense_layers, "moe_layer_freq": 1,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads,
            "n_routed_experts": m.n_routed_experts, "n_shared_experts": m.n_shared_experts,
            "num_experts_per_tok": m.n_activated_experts, "n_group": m.n_expert_groups,
            "topk_group": m.n_limited_groups, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "norm_topk_prob": True,
            "routed_scaling_factor": m.route_scale, "aux_loss_alpha": m.seq_aux_alpha,
            "seq_aux": True, "q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "rope_theta": m.rope_theta, "rope_scaling": None,
            "rope_interleave": True, "max_position_embeddings": m.max_seq_len,
            "num_nextn_predict_layers": 0, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
            "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
            "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def hf_state_dict(model: Transformer) -> dict:
    """The model's weights and router biases under hf_name, one tensor per expert as DeepSeek-V3
    publishes them (transformers stacks them when it loads); without shared experts, the empty
    ones transformers builds in their place (width 0)."""
    tensors = {hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    c = model.cfg
    empty = {"w1": (0, c.dim), "w3": (0, c.dim), "w2": (c.dim, 0)}
    for i in range(c.n_dense_layers, c.n_layers) if c.n_shared_experts == 0 else ():
        for w, shape in empty.items():
            tensors[hf_name(f"layers.{i}.ffn.shared_experts.{w}.weight")] = torch.zeros(shape)
    return tensors


def export_hf(cfg, eot: int):
    """--stage export: --init_from (default out_dir/final.pt) -> out_dir/hf/: config.json,
    generation_config.json, and the weights as model.safetensors (pytorch_model.bin where the
    safetensors package is not installed). One line and exit 2 for what cannot be exported."""
    path = cfg.init_from or os.path.join(cfg.out_dir, "final.pt")
    model, _ = load_checkpoint(path, torch.device("cpu"))
    m, target = model.cfg, os.path.join(cfg.out_dir, "hf")
    if m.score_func != "sigmoid":
        config_error(f"cannot export {path}: DeepseekV3ForCausalLM scores experts with a sigmoid, "
                     f"this model with {m.score_func}")
    if m.n_routed_experts // m.n_expert_groups < 2:
        config_error(f"cannot export {path}: DeepseekV3ForCausalLM needs >= 2 routed experts per "
                     f"group (it scores a group by its top 2)")
    writable_dir(target, f"cannot export to {target}/")
    try:
        from safetensors.torch import save as safetensors_bytes
        weights, stale = "model.safetensors", "pytorch_model.bin"
    except ImportError:
        safetensors_bytes, weights, stale = None, "pytorch_model.bin", "model.safetensors"
    tensors = hf_state_dict(model)
    with atomic_write(os.path.join(target, weights), "wb") as f:
        if safetensors_bytes:
            f.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
        else:
            torch.save(tensors, f)
    with contextlib.suppress(FileNotFoundError):   # transformers would load an older one first
        os.remove(os.path.join(target, stale))
    write_json(os.path.join(target, "config.json"), hf_config(m, eot))
    write_json(os.path.join(target, "generation_config.json"),
               {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
    print(f"exported {path} ({model.num_params() / 1e6:.2f}M params) to {target}/: config.json, "
          f"{weights} ({len(tensors)} tensors); load it with transformers' "
          f"AutoModelForCausalLM.from_pretrained({target!r})")


# -----------------------------------------------------------------------------
# Resume: out_dir/ckpt.pt holds the model, the optimizer and the step; a resumed run must have
# the settings of the run that wrote it, except those that do not change what it computes.

RESUME_FREE = {"stage", "out_dir", "init_from", "resume", "device", "threads", "compile",
               "log_every", "eval_every", "ckpt_every", "grpo_eval_every", "grpo_ckpt_every",
               "grpo_eval_n", "n_test", "eval_batch", "prompt", "num_samples",
               # the R1-recipe stages' settings: an R1-Zero run (all, pretrain, grpo) never reads
               "sft_data", "sft_epochs", "sft_batch", "sft_lr", "cold_start", "rs_prompts",
               "rs_samples", "r1_grpo_steps", "student_dim", "student_layers",
               "student_pretrain_steps", "student_grpo_steps"}


def read_resume_checkpoint(cfg, device, vocab_size: int) -> tuple:
    """--resume: out_dir/ckpt.pt, checked against this run's settings before anything runs or is
    written -> (checkpoint, the checkpoint if GRPO wrote it); (None, None) without --resume, or if
    there is none yet (the run was stopped before its first checkpoint)."""
    if not cfg.resume:
        return None, None
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        print0(f"--resume: no {path} yet, so starting from the beginning")
        return None, None
    ckpt = read_checkpoint(path, device)
    training = {"stage", "step", "optimizer"} <= ckpt.keys()
    if not training or ckpt["stage"] not in ("pretrain", "grpo"):
        raise SystemExit(f"error: cannot resume from {path}: not a training checkpoint (no stage, "
                         f"step and optimizer state)")
    then = {**ckpt["config"], **ckpt["model_config"]}
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
    now.update(dataclasses.asdict(dataclasses.replace(cfg.model, vocab_size=vocab_size)))
    diff = [f"--{k} {then.get(k, '(unset)')!r} there, {v!r} now" for k, v in now.items()
            if k not in RESUME_FREE and then.get(k, "(unset)") != v]
    if diff:
        config_error(f"cannot resume from {path}: it was written with other settings: "
                     f"{'; '.join(diff)} (resume with that run's flags, or start a new run with "
                     f"another --out_dir)")
    where = f"{path} is at {ckpt['stage']} step {ckpt['step']}"
    if ckpt["stage"] == "pretrain" and cfg.stage == "grpo":
        config_error(f"cannot resume with --stage grpo: {where}; resume with --stage all or "
                     f"pretrain")
    if ckpt["stage"] == "grpo" and cfg.stage == "pretrain":
        config_error(f"nothing to resume with --stage pretrain: {where}, pretraining is done")
    print0(f"resuming: {where}")
    return ckpt, (ckpt if ckpt["stage"] == "grpo" else None)


def restore_optimizer(opt, resume) -> int:
    """Load a training checkpoint's optimizer state -> the step to continue from (0: none)."""
    if not resume:
        return 0
    try:
        opt.load_state_dict(resume["optimizer"])
    except (ValueError, KeyError) as e:   # e.g. written by a version with other optimizers
        config_error(f"cannot resume from the checkpoint: {first_line(e)}; start a new run with "
                     "another --out_dir")
    return resume["step"]


# -----------------------------------------------------------------------------
# Stopping safely. A kill (SIGKILL, a crash, a power cut) loses at most the steps since the last
# checkpoint: the training loops write out_dir/ckpt.pt every ckpt_every steps, atomically, with
# the optimizer state, and draw each step's randomness from (seed, step, rank) alone, so --resume
# repeats exactly what the lost steps did. Ctrl-C (SIGINT) or SIGTERM during training loses
# nothing: the step finishes, ckpt.pt is written, and the run exits with 128 + the signal number
# (130 for Ctrl-C) after printing the command that resumes it. Outside the training loops
# (evaluations, plots) it exits at once: the last checkpoint already holds every finished step.

_RUN = {"argv": [], "signal": None, "in_loop": False}   # argv: the flags that resume this run


def remember_resume_flags(cfg, argv: list):
    """The flags that resume this run (None: a stage that runs again instead, not training)."""
    if cfg.stage in RECIPE_STAGES + MODEL_STAGES:
        _RUN["argv"] = None
    else:
        _RUN["argv"] = argv if cfg.resume else argv + ["--resume"]


def resume_command() -> str:
    prog = sys.argv[0] if sys.argv[0].endswith(".py") else "nanor1.py"
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))   # torchrun's --nproc_per_node
    launch = f"torchrun --standalone --nproc_per_node={world} {prog}" if world > 1 else \
        f"python {prog}"
    if world > local:   # several machines: only each node knows its own launch (train.sh's NNODES)
        launch = f"on each of the {world // local} nodes, its torchrun launch of {prog}"
    return f"{launch} {shlex.join(_RUN['argv'])}"


def how_to_resume() -> str:
    if _RUN["argv"] is None:
        return "this stage does not resume: run it again"
    return f"resume with: {resume_command()}"


def on_signal(signum, frame):
    if _RUN["in_loop"] and _RUN["signal"] is None:   # the training loop stops after this step
        _RUN["signal"] = signum
        os.write(2, b"\nstopping: finishing this step and saving a checkpoint "
                    b"(again to stop at once)\n")
        return
    os.write(2, f"\nstopped by {signal.Signals(signum).name}; {how_to_resume()}\n".encode())
    raise SystemExit(128 + signum)


def install_signal_handlers():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


@contextlib.contextmanager
def training_loop():
    """Inside: a signal lets the current step finish (checkpoint_or_stop then saves and exits)."""
    _RUN["in_loop"] = True
    try:
        yield
    finally:
        _RUN["in_loop"] = False


def checkpoint_or_stop(cfg, model, opt, stage: str, step: int, total: int, every: int, rank: int,
                       device):
    """After each finished step: write out_dir/ckpt.pt every `every` steps and after the last one;
    after a signal, write it now and exit. Every rank stops at the same step."""
    stop = _RUN["signal"] is not None
    if dist.is_initialized():
        stop = all_reduce_sum(torch.tensor(float(stop), device=device)).item() > 0
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if rank == 0 and (stop or step == total or (every and step % every == 0)):
        save_checkpoint(path, model, cfg, stage=stage, step=step, optimizer=opt.state_dict())
    if stop:
        signum = _RUN["signal"] or signal.SIGINT
        print0(f"stopped by {signal.Signals(signum).name} at {stage} step {step}/{total}, saved "
               f"{path}; {how_to_resume()}")
        sys.exit(128 + signum)


def side_by_side_muon(hidden: list, adamw, shards: int = 2, **muon_kwargs) -> "Optimizers":
    """torch.optim.Muon over the hidden matrices in shards of about equal work (largest first,
    dealt round-robin), stepped side by side on a CPU's cores, then adamw (see Optimizers)."""
    hidden = sorted(hidden, key=lambda p: -p.numel())
    muons = [torch.optim.Muon(hidden[i::shards], **muon_kwargs)
             for i in range(min(shards, len(hidden)))]
    return Optimizers(*muons, adamw, side_by_side=len(muons))


class Optimizers:
    """Several optimizers over disjoint parameters, stepped as one (Muon + AdamW): one list of
    param_groups, one state_dict (a checkpoint's "optimizer"). side_by_side: the first n step at
    the same time on a CPU, one thread each, when torch has as many threads (side_by_side_muon's
    shards: Newton-Schulz is a chain of small matmuls, one matrix after another, that a second
    core barely speeds up, but a second shard keeps it busy: ~4% of a pretraining step on 2
    cores). Each parameter's update is its own, so the result is the serial one's."""

    def __init__(self, *opts, side_by_side: int = 1):
        self.opts, self.side_by_side, self._pool = opts, side_by_side, None

    @property
    def param_groups(self) -> list:   # read anew: load_state_dict replaces the groups' dicts
        return [g for o in self.opts for g in o.param_groups]

    def step(self):
        n, threads = self.side_by_side, torch.get_num_threads()
        on_cpu = all(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        if n < 2 or threads < n or not on_cpu:
            for o in self.opts:
                o.step()
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="optimizer")
        torch.set_num_threads(threads // n)   # torch's thread count is global: shared out
        try:
            list(self._pool.map(lambda o: o.step(), self.opts[:n]))
        finally:
            torch.set_num_threads(threads)
        for o in self.opts[n:]:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state: dict):
        if len(state.get("optimizers", ())) != len(self.opts):
            raise ValueError("the checkpoint's optimizer state is for another optimizer "
                             "(another --optimizer, or another version of nanor1)")
        for o, s in zip(self.opts, state["optimizers"]):
            o.load_state_dict(s)


def clipped_step(cfg, model, opt, lr: float, loss: float, stage: str, step: int, total: int,
                 lr_flag: str):
    """The optimizer step of every stage: clip the gradient norm to grad_clip, stop on a
    non-finite loss or gradient (check_finite), then step opt at lr and zero the gradients."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    check_finite(cfg, stage, step, total, loss, norm.item(), lr_flag)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def check_finite(cfg, stage: str, step: int, total: int, loss: float, grad_norm: float,
                 lr_flag: str):
    """A NaN or infinite loss or gradient stops the run before the update reaches the weights, so
    the last checkpoint stays the last good one."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        kept = f"the last checkpoint, {path}, is kept" if os.path.exists(path) else \
            "no checkpoint was written"
        raise SystemExit(f"error: non-finite loss at {stage} step {step}/{total} (loss {loss:.4g}, "
                         f"grad norm {grad_norm:.4g}): stopped before the update; {kept}. "
                         f"Try a lower {lr_flag}")


# -----------------------------------------------------------------------------
# Progress lines with an ETA, and MFU

def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s"


class Progress:
    """The progress line of a training loop, every `every` steps: "name step/total | ... | eta".
    seconds_per_step() is measured since the last line; the ETA from the mean step time since
    the loop started (or resumed at `start`). max_seconds > 0: the loop stops at that wall time,
    so the line counts seconds instead of steps."""

    def __init__(self, cfg, name: str, total: int, every: int, start: int = 0, digits: int = 4,
                 max_seconds: float = 0, tokens_per_step: int = 0, flops_per_token: float = 0,
                 peak=None):
        self.cfg, self.name, self.total, self.every, self.digits = cfg, name, total, every, digits
        self.start, self.max_seconds = start, max_seconds
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak
        self.t_start = self.t_last = time.time()
        self.step_last = start

    def due(self, step: int) -> bool:
        """step: steps done so far (1-based)."""
        return step % self.every == 0 or step == self.total

    def elapsed(self) -> float:
        return time.time() - self.t_start

    def out_of_time(self) -> bool:
        return 0 < self.max_seconds <= self.elapsed()

    def seconds_per_step(self, step: int) -> float:
        """Wall time per step since the last line (and starts the next interval)."""
        now = time.time()
        dt = (now - self.t_last) / (step - self.step_last)
        self.t_last, self.step_last = now, step
        return dt

    def line(self, step: int, fields: str, last: bool = False):
        """Print "name step/total | fields | eta" (rank 0); last: the loop ends after this step."""
        elapsed = self.elapsed()
        eta = 0 if last else elapsed / (step - self.start) * (self.total - step)
        of = f"{self.total}"
        if self.max_seconds:
            eta = min(eta, max(0, self.max_seconds - elapsed))
            of = f"{elapsed:.0f}s/{self.max_seconds:.0f}s"
        print0(f"{self.name} {step:0{self.digits}d}/{of} | {fields} | eta {fmt_time(eta)}")


# Dense bf16 tensor-core peaks (FLOP/s per GPU: fp32 accumulate, no 2:4 sparsity) from NVIDIA's
# datasheets, as regexes tried in order on torch.cuda.get_device_name(). Not listed: "unknown".
PEAK_FLOPS = [(r"H100.*PCIe", 756e12), (r"H[12]00.*NVL", 835e12),
              (r"H100|H200", 989e12),  # SXM, GH200
              (r"B200", 2250e12), (r"A100|A800", 312e12), (r"\bA30\b", 165e12),
              (r"\bA10\b", 125e12), (r"L40S", 362e12), (r"\bL40\b", 181e12), (r"\bL4\b", 121e12),
              (r"RTX A6000", 155e12), (r"RTX 4090", 165e12), (r"RTX 3090", 71e12)]


def pretrain_progress(cfg, model, start: int, peak) -> "Progress":
    """Pretraining's progress line: every log_every steps, with tokens/s and MFU (peak: the
    device's peak FLOP/s, peak_flops)."""
    return Progress(cfg, "pretrain", cfg.pretrain_steps, cfg.log_every, start, digits=5,
                    tokens_per_step=cfg.batch_size * cfg.block_size,
                    flops_per_token=model.flops_per_token(cfg.block_size), peak=peak)


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


def peak_memory_gb(device) -> float:
    """The most memory this process has held so far, in GB: the CUDA allocator's peak on a GPU,
    the resident set's on a CPU (None where the platform cannot say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource
    except ImportError:   # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def mfu(flops_per_token: float, tokens_per_second: float, world: int, peak) -> str:
    """Model FLOP utilisation of one rank, as text ("unknown" without a peak)."""
    return f"{100 * flops_per_token * tokens_per_second / world / peak:.0f}%" if peak else "unknown"


# -----------------------------------------------------------------------------
# Distillation's student

def student_config(teacher: ModelConfig, dim: int, n_layers: int = 0) -> ModelConfig:
    """The teacher's architecture at width dim: every width (FFNs, experts, MLA latent and head
    dims) scaled by dim / teacher.dim, so the parameters shrink about as its square (dim 64 of
    128: about a quarter); heads, experts and routing are kept. n_layers 0 keeps the depth."""
    t, s, layers = teacher, dim / teacher.dim, n_layers or teacher.n_layers
    w = lambda x: max(1, round(x * s))
    return dataclasses.replace(
        t, dim=dim, inter_dim=w(t.inter_dim), moe_inter_dim=w(t.moe_inter_dim),
        q_lora_rank=round(t.q_lora_rank * s), kv_lora_rank=w(t.kv_lora_rank),
        qk_nope_head_dim=w(t.qk_nope_head_dim), v_head_dim=w(t.v_head_dim),
        qk_rope_head_dim=2 * max(1, round(t.qk_rope_head_dim * s / 2)),           # even
        n_layers=layers, n_dense_layers=min(t.n_dense_layers, layers))
