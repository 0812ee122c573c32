"""
nanor1: DeepSeek-R1-Zero in miniature. A tiny DeepSeek-V3 (MLA + DeepSeekMoE, see moe.py) is
pretrained from scratch on arithmetic, then trained with GRPO on verifiable rewards until it
learns, by itself, to think step by step before it answers.

    python nanor1.py                         # everything, on a 2-core CPU (~3 min)
    python nanor1.py --stage grpo            # one stage alone, from out/base.pt (eval: final.pt)
    python nanor1.py ... --resume            # continue a killed or stopped run (same flags)
    python nanor1.py --stage r1              # the R1 recipe from out/base.pt
    python nanor1.py --stage distill         # a 4x smaller student, RL vs distilled
    python nanor1.py --stage sample --prompt "(47+85)*3-29"   # ask out/final.pt a problem
    python nanor1.py --stage export          # out/final.pt -> out/hf/, a HF DeepSeek-V3 checkpoint
    bash aha.sh                              # the aha moment: reflection planted, then counted
    bash train.sh                            # GPUs: a larger preset under torchrun
    python nanor1.py --help                  # every setting, with its default

In the order things run: config, tokenizer, pretraining, rewards, rollouts, evaluation, the GRPO
math, the GRPO trainer, the R1 recipe, distillation, main(). The machinery (flags, torchrun,
checkpoints, resume, progress, export) is in plumbing.py, the plots, tables and pages in report.py.

Where nanor1 departs from DeepSeek-R1-Zero, and why:
  1. The task is arithmetic, generated in code, not competition math: answers are checkable by a
     parser, and a 1M-parameter model can learn it on a CPU in minutes.
  2. A minority of the pretraining documents (--think_frac) are worked solutions in the R1 tags:
     DeepSeek-V3-Base saw reasoning on the web, ours has to see it somewhere. GRPO still has to
     discover, from reward alone, that thinking pays.
  3. The prompt is the problem alone ("(47+85)*3-29="), not R1's template: a tiny model has no
     use for instructions. The format reward asks for the same <think>/<answer> shape.
  4. Rewards are rule-based as in R1-Zero (accuracy + format); GRPO as in DeepSeekMath, with the
     Dr. GRPO and DAPO variants as flags (--scale_by_std, --agg, --clip_high, --drop_zero_std).
  5. Everything is tiny (~1.2M parameters, groups of 8, 15 RL steps), and pretraining uses Muon
     (as Moonlight does) where V3 used AdamW: the same skill in far fewer steps.
  6. DeepSeek-R1's multi-stage recipe (--stage r1) and distillation (--stage distill) are here in
     miniature, simplified as said in their section.
  7. The "aha moment" (bash aha.sh): reflection (checks, retries) is planted in a minority of the
     pretraining documents, and counted exactly by a parser (data/reflect.py), not by keywords.
"""
import contextlib
import copy
import dataclasses
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import tiktoken
import torch
import torch.nn.functional as F

from data import (LEVELS, is_heldout, only_training, reflective_solution, subset, test_set,
                  training_problems, worked_solutions)
from data.reflect import COUNT_FIELDS, counts_vector
from moe import KVCache, ModelConfig, Transformer
import report
from plumbing import (MODEL_STAGES, Progress, RECIPE_STAGES, accum_steps, all_reduce_sum, autocast,
                      checkpoint_or_stop, clipped_step, epoch_batches, export_hf, grad_sync,
                      grpo_rank_shares, install_signal_handlers, level_weights, load_base_model,
                      load_stage_model, log_metrics, mark_unlearned, pack_rows, pack_sequences,
                      pad_left, peak_flops, prepare_out_dir, pretrain_progress, print0,
                      rank_and_world, read_problems, read_resume_checkpoint, read_sft_data,
                      remember_resume_flags, response_lengths, restore_optimizer, run_levels,
                      sample, save_checkpoint, setup, sft_rows, side_by_side_muon, stage_cfg,
                      start_metrics, student_config, teardown, through_first, trained_levels,
                      training_loop, wrap_ddp, write_jsonl)
from plumbing import parse_args as parse_flags
from report import levels_line

# -----------------------------------------------------------------------------
# Config: the run's settings, plus moe.ModelConfig for the model; each field is a --flag (its
# comment the --help line).

@dataclass
class Config:
    # run
    stage: str = "all"  # all|pretrain|grpo|eval (R1-Zero), sft|rejection|distill|r1, export|sample
    out_dir: str = "out"  # checkpoints, metrics, plots, summary
    init_from: str = ""   # the stage's model (default out_dir/base.pt, or final.pt for eval etc.)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"   # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the training forward (CUDA)
    threads: int = 0      # torch CPU threads (0 = torch's default)
    resume: bool = False  # continue the run in out_dir/ckpt.pt (killed or stopped; same flags)
    prompt: list = field(default_factory=list)  # --stage sample: a problem (repeatable; else stdin)
    num_samples: int = 4  # --stage sample: completions sampled per problem, besides the greedy one
    # data
    think_frac: float = 0.4         # share of pretraining documents written as worked solutions
    level_weights: str = "1,1,2,2"  # pretraining mix of add2,add3,mul,multi (the hard ones x2)
    edge_weight: float = 0.0        # weight of the edge level mul2 (> 0: pretrained, tested, RL'd)
    verify_frac: float = 0.0        # share of worked solutions that check a result (bash aha.sh)
    retry_frac: float = 0.0         # share that write a column wrong, then " wait " and redo it
    mask_errors: bool = True        # their planted wrong values are inputs, never targets
    n_test: int = 200               # held-out problems per level
    # pretraining
    pretrain_steps: int = 500
    batch_size: int = 32    # rows per step (global, across ranks and accumulation)
    block_size: int = 128   # tokens per row, packed with whole documents
    grad_accum: int = 1     # micro-steps per step (divided among ranks)
    lr: float = 6e-3
    min_lr_frac: float = 0.1  # the lr decays to lr * min_lr_frac...
    decay_frac: float = 0.5   # ...by a cosine over this last share of the steps (before: constant)
    warmup_steps: int = 40
    weight_decay: float = 0.1  # on matrices only
    optimizer: str = "muon"    # muon (hidden matrices; AdamW for the rest) | adamw
    embed_lr_mult: float = 3.0  # with muon: the embedding and head learn at lr x this
    muon_momentum: float = 0.95  # with muon: its momentum (torch's default)
    grad_clip: float = 1.0
    log_every: int = 100
    eval_every: int = 250   # quick held-out eval during pretraining (0 = never)
    ckpt_every: int = 250   # write out_dir/ckpt.pt every N pretraining steps (and at the end)
    # GRPO
    grpo_steps: int = 15
    prompts_per_step: int = 8   # global, across ranks
    group_size: int = 8         # G completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0              # 0 = sample from the full distribution
    grpo_lr: float = 1e-4
    grpo_head_lr_mult: float = 5.0  # the output head learns at grpo_lr x this
    mu: int = 1                 # policy updates per rollout batch
    clip_low: float = 0.2       # ratio clipped to [1-clip_low, 1+clip_high]
    clip_high: float = 0.2      # DAPO's clip-higher uses e.g. 0.28
    beta: float = 0.02          # weight of the k3 KL to the reference (base) model
    agg: str = "seq"            # seq (GRPO) | token (DAPO) | constant (Dr. GRPO)
    scale_by_std: bool = True   # divide advantages by the group std (False = Dr. GRPO)
    drop_zero_std: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal
    acc_weight: float = 1.0     # reward = acc_weight * accuracy + format_weight * format
    format_weight: float = 0.2
    grpo_eval_every: int = 10   # held-out eval during GRPO (0 = none; the result's follows it)
    grpo_ckpt_every: int = 50   # write out_dir/ckpt.pt every N GRPO steps (and at the end)
    grpo_eval_n: int = 50       # problems per level for those evals
    eval_batch: int = 256       # sequences per generation batch (evaluation, rejection sampling)
    # the R1 recipe: SFT, rejection sampling, distillation (stages sft, rejection, distill, r1)
    sft_data: str = ""          # {prompt, completion} jsonl for --stage sft (default: cold_start)
    sft_epochs: int = 2         # passes over the SFT data (R1 fine-tunes for two epochs)
    sft_batch: int = 32         # examples per SFT step
    sft_lr: float = 3e-4        # peak SFT learning rate (warmup, cosine to sft_lr * min_lr_frac)
    cold_start: int = 512       # worked solutions of training problems for the cold-start SFT
    rs_prompts: int = 1024      # training problems for rejection sampling
    rs_samples: int = 4         # K samples per problem; the right, well-formed, distinct are kept
    r1_grpo_steps: int = 50     # GRPO steps in each of --stage r1's two RL stages
    student_dim: int = 64       # the student's width (all its widths are the teacher's x dim ratio)
    student_layers: int = 0     # the student's layers (0 = as many as the teacher)
    student_pretrain_steps: int = 0  # the student's pretraining steps (0 = --pretrain_steps)
    student_grpo_steps: int = 0  # GRPO steps of the RL-only student (0 = those in the SFT's time)
    model: ModelConfig = field(default_factory=ModelConfig)


def parse_args(argv=None) -> Config:
    """Flags -> Config; a bad flag or value ends with one line on stderr and exit code 2."""
    return parse_flags(Config, argv)


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken, built in code (nothing is downloaded). One token per byte, so every digit is
# one token, plus special tokens for R1-Zero's <think>/<answer> tags (DeepSeek-R1 table 1).

SPECIALS = ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>"]


def build_tokenizer() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="nanor1", pat_str=r"\d|[^\d]+", mergeable_ranks=ranks,
                             special_tokens={s: 256 + i for i, s in enumerate(SPECIALS)})


enc = build_tokenizer()
EOT, THINK, END_THINK, ANSWER, END_ANSWER = (enc.encode_single_token(s) for s in SPECIALS)


def encode(text: str) -> list:
    return enc.encode(text, allowed_special="all")


def prompt_tokens(p) -> list:
    """What the model sees before it answers: end-of-text (the document separator), then the
    prompt ("(47+85)*3-29=") of the Problem p, or the prompt text p."""
    return [EOT] + encode(p if isinstance(p, str) else p.prompt)


def draw_problems(rng: random.Random, n: int, levels=LEVELS) -> list:
    """n training problems (never a held-out one) of levels, from a stream seeded by rng."""
    problems = training_problems(rng, levels)
    return [next(problems) for _ in range(n)]


# -----------------------------------------------------------------------------
# Pretraining (DeepSeek-V3 sec 4 in miniature): next-token prediction on packed rows of
# arithmetic documents, Muon and AdamW, warmup, constant, then a cosine decay.

def pretrain_documents(cfg: Config, rng: random.Random):
    """Endless documents (token lists) ending in end-of-text, to learn to stop: a problem (levels
    mixed by --level_weights) with its answer, or its worked solution (probability think_frac),
    a share of those reflective (--verify_frac, --retry_frac), whose planted error the model reads
    but is never trained to write (--mask_errors: plumbing.mark_unlearned, pack_rows)."""
    problems = training_problems(rng, *run_levels(cfg))
    reflect_share = cfg.verify_frac + cfg.retry_frac                # of the worked solutions
    while True:
        p = next(problems)
        think = rng.random() < cfg.think_frac
        solution, errors = "", []                                   # "": the plain solution
        if think and reflect_share and rng.random() < reflect_share:
            form = "verify" if rng.random() * reflect_share < cfg.verify_frac else "retry"
            solution, errors = reflective_solution(p.ops, form, rng)
        doc = encode(p.document(think, solution)) + [EOT]
        if cfg.mask_errors:   # errors: character spans of the solution, one token per character
            doc = mark_unlearned(doc, errors, at=len(encode(p.prompt)) + 1)   # + 1: <think>
        yield doc


def pretrain_batches(cfg: Config, rng: random.Random, rows: int):
    """Endless (x, y) batches: rows of block_size tokens packed with whole documents after an
    end-of-text, as prompts are (plumbing.pack_rows); targets the next tokens, -1 on padding."""
    docs, queue = pretrain_documents(cfg, rng), []
    while True:
        yield pack_rows(docs, queue, rows, cfg.block_size, EOT)


def lr_at(step: int, total: int, cfg: Config, base_lr: float) -> float:
    """Linear warmup, constant, then a cosine decay to base_lr * min_lr_frac over the last
    decay_frac of the steps (DeepSeek-V3 sec 4.2 decays in the same three phases)."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    start = max(cfg.warmup_steps, total - round(cfg.decay_frac * total))   # the decay's first step
    progress = min(1.0, (step - start) / max(1, total - start)) if step > start else 0.0
    cosine = 0.5 * (1 + math.cos(math.pi * progress))                  # 1 -> 0
    return base_lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def make_optimizer(model, lr, weight_decay, device, muon=False, lr_mult=None, momentum=0.95):
    """AdamW; weight decay on the matrices only (not on norms, which would pull them to 0).
    muon: the hidden matrices (attention, FFNs, experts) take Muon instead, which orthogonalises
    each momentum update by Newton-Schulz (Jordan et al. 2024), scaled to AdamW's update size as
    Kimi's Moonlight does (match_rms_adamw: one lr serves both); AdamW keeps the embedding, head,
    norms and router. lr_mult: {parameter name: x} for AdamW parameters that learn at lr * x
    (clipped_step keeps each group at the schedule's lr times its lr_mult)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in params if muon and p.dim() == 2 and n.startswith("layers.")
              and ".gate." not in n]
    mult, in_muon = lr_mult or {}, {id(p) for p in hidden}
    rest = [(n, p) for n, p in params if n not in mult and id(p) not in in_muon]
    groups = [{"params": [p for n, p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for n, p in rest if p.dim() < 2], "weight_decay": 0.0}]
    groups += [{"params": [p], "weight_decay": weight_decay if p.dim() >= 2 else 0.0,
                "lr": lr * mult[n], "lr_mult": mult[n]} for n, p in params
               if n in mult and id(p) not in in_muon]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                              fused=device.type == "cuda")
    if not hidden:
        return adamw
    return side_by_side_muon(hidden, adamw, lr=lr, weight_decay=weight_decay, momentum=momentum,
                             adjust_lr_fn="match_rms_adamw")   # 2 shards, on a CPU a core each


def pretrain(cfg: Config, model: Transformer, device, rank: int, world: int, tests: dict,
             resume: dict = None):
    """Pretrain model in place; resume: a checkpoint of this stage to continue from (see main)."""
    accum, total = accum_steps(cfg, world), cfg.pretrain_steps
    rows = cfg.batch_size // (accum * world)          # rows per micro-step on this rank
    # a seed per step and micro-batch of the global batch (rank r takes r*accum...): the same data
    # on any number of ranks, and a resumed run trains on what an uninterrupted one would
    def batch(step, micro):
        seed = f"{cfg.seed}-pretrain-{step}-{rank * accum + micro}"
        return next(pretrain_batches(cfg, random.Random(seed), rows))
    muon = cfg.optimizer == "muon"   # and with it, the embedding and head learn faster
    mult = dict.fromkeys(("embed.weight", "head.weight"), cfg.embed_lr_mult) if muon else None
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, device, muon, mult, cfg.muon_momentum)
    start = restore_optimizer(opt, resume)
    ddp = wrap_ddp(model, device)
    fwd = torch.compile(ddp) if cfg.compile else ddp
    print0(report.pretrain_banner(cfg, model))
    progress = pretrain_progress(cfg, model, start, peak_flops(device))   # tokens/s, MFU, ETA
    losses = []
    with training_loop():
        for step in range(start, total):
            lr = lr_at(step, total, cfg, cfg.lr)
            for micro in range(accum):
                x, y = (t.to(device) for t in batch(step, micro))
                with grad_sync(ddp, last=micro == accum - 1):   # DDP syncs on the last one only
                    with autocast(cfg, device):
                        # each packed document attends to itself only, as a prompt alone would
                        logits, aux = fwd(x, doc_ids=(x == EOT).cumsum(1))
                        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                               y.reshape(-1), ignore_index=-1)
                    ((loss + aux) / accum).backward()
                losses.append(loss.item())
            clipped_step(cfg, model, opt, lr, sum(losses[-accum:]), "pretrain", step + 1, total,
                         "--lr")
            loads = model.update_router_biases()   # V3's aux-loss-free balancing: not a gradient
            if progress.due(step + 1):   # the mean loss of the steps since the last line
                report.log_pretrain_step(cfg, progress, step + 1, losses, lr, loads, device, world)
                losses = []
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                res = evaluate(model, subset(tests, 32), cfg, device, force="think")   # the skill
                print0("  held-out (greedy, 32/level, forced to think): " + levels_line(res))
            checkpoint_or_stop(cfg, model, opt, "pretrain", step + 1, total,
                               cfg.ckpt_every, rank, device)
    return model


# -----------------------------------------------------------------------------
# Rewards (DeepSeek-R1 sec 2.2.2): rule-based, computed by parsing. Model output is untrusted
# text: it is matched against fixed patterns and never evaluated.

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


# -----------------------------------------------------------------------------
# Rollouts: batched sampling with the absorbed MLA cache (DeepSeek-V2 sec 2.1.3: only c_KV and
# k_R are cached per token); the token sampler, plumbing.sample, is exact inverse-CDF sampling

@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, greedy: bool = False, generator=None, autocast_ctx=None):
    """Sample completions of token-list prompts -> completions (B, L) (finished rows padded with
    EOT), mask (B, L) (1 up to and including the first EOT), truncated (B,) (no EOT at all)."""
    device, was_training = model.embed.weight.device, model.training
    model.eval()                                  # inference: no router loads, no balance loss
    tokens, key_mask = pad_left(prompts, EOT, device)    # left-padded, key_mask False on padding
    B, P = tokens.shape
    cache = KVCache(model.cfg, B, P + max_new_tokens, attn_impl="absorb", device=device)
    out = torch.full((B, max_new_tokens), EOT, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with torch.inference_mode(), autocast_ctx or contextlib.nullcontext():   # no autograd at all
        logits, _ = model(tokens, cache=cache, key_mask=key_mask)               # prefill
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
            logits, _ = model(nxt[:, None], start_pos=P + t, cache=cache)      # one token, cached
    model.train(was_training)
    out = out[:, :t + 1]
    return out, through_first(out, EOT), ~done


def completion_text(tokens: torch.Tensor) -> str:
    """Decode a completion up to (not including) its first end-of-text."""
    ids = tokens.tolist()
    return enc.decode(ids[:ids.index(EOT)] if EOT in ids else ids)


# -----------------------------------------------------------------------------
# Evaluation (DeepSeek-R1 sec 2.2.4, fig. 2-3): held-out accuracy per level, how often the model
# thinks, how long it writes. Accuracy and response length rising together is R1-Zero's signature.

@torch.no_grad()
def evaluate(model, tests: dict, cfg: Config, device, greedy: bool = True, seed: int = 0,
             force: str = "", shown: list = None) -> dict:
    """-> {level and "overall": {accuracy, think_rate, mean_length, format, reflection}}, sharded
    over ranks (reflection: data/reflect.py's rates over the worked solutions).
    force="think" or "answer" starts every completion with that tag: the accuracy the model would
    have if it always thought, or always answered directly. shown: a list that gets this rank's
    completions, as records (for out_dir/samples.html)."""
    forced = {"": [], "think": [THINK], "answer": [ANSWER]}[force]
    rank, world = rank_and_world()
    items = [(li, p) for li, lvl in enumerate(tests) for p in tests[lvl]][rank::world]
    sums = torch.zeros(len(tests), 5 + len(COUNT_FIELDS), dtype=torch.float64)
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    for i in range(0, len(items), cfg.eval_batch):
        chunk = items[i:i + cfg.eval_batch]
        comps, mask, truncated = generate(model, [prompt_tokens(p) + forced for _, p in chunk],
                                          cfg.max_new_tokens, cfg.temperature, greedy=greedy,
                                          generator=gen, autocast_ctx=autocast(cfg, device))
        lengths = response_lengths(mask, truncated).tolist()
        for (li, p), comp, n in zip(chunk, comps, lengths):
            text = enc.decode(forced) + completion_text(comp)   # the forced tag is its own
            acc, fmt = accuracy_reward(text, p.answer), format_reward(text)
            sums[li] += torch.tensor([1, acc, text.startswith("<think>"), n, fmt]
                                     + counts_vector(text), dtype=torch.float64)   # reflection
            if shown is not None:
                shown.append(dict(p.record(text), right=acc == 1.0, well_formed=fmt == 1.0))
    return report.level_rates(all_reduce_sum(sums.to(device)).cpu(), list(tests))


def ask(cfg: Config, device):
    """--stage sample: the model's greedy answer and num_samples sampled ones to each problem."""
    model, _, run_config = load_stage_model(cfg, device, "final.pt")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    for p in read_problems(cfg, prompt_tokens, model.cfg.max_seq_len):
        print(report.problem_line(p, trained_levels(run_config)))
        for i, greedy in enumerate([True] + [False] * cfg.num_samples):   # 0: the greedy one
            comp = generate(model, [prompt_tokens(p)], cfg.max_new_tokens, cfg.temperature,
                            cfg.top_k, greedy, gen, autocast(cfg, device))[0][0]
            text = completion_text(comp)
            acc, fmt = accuracy_reward(text, p.answer), format_reward(text)
            reward = cfg.acc_weight * acc + cfg.format_weight * fmt
            print(report.answer_line(i, text, parse_answer(text), acc == 1.0, reward))


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


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low: float = 0.2,
              clip_high: float = 0.2, beta: float = 0.04, agg: str = "seq", max_len=None):
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
# The GRPO trainer (DeepSeekMath Algorithm 1, with pi_ref frozen at the base as in R1-Zero)

def sequence_logprobs(model, tokens, key_mask, P: int, comp_mask, autocast_ctx):
    """log pi(completion token | everything before) for tokens[:, P:] up to each completion's end
    (comp_mask), 0 after it: (B, L); also entropy (B, L) and the model's balance loss. Computed on
    the sequences packed without padding (plumbing.pack_sequences): the same numbers."""
    x, doc_ids, at, valid = pack_sequences(tokens, key_mask, P, comp_mask)
    with autocast_ctx:
        logits, aux = model(x, doc_ids=doc_ids)
    logits = logits.flatten(0, 1)[at].float()              # (B, L, V): predicting tokens[:, P:]
    logprobs = logits.log_softmax(-1)
    logp = logprobs.gather(-1, tokens[:, P:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp.masked_fill(~valid, 0.0), entropy.masked_fill(~valid, 0.0), aux


def policy_update(cfg: Config, model, ddp, ref, opt, prompts: list, comps, comp_mask, advantages,
                  keep, step: int, device, world: int):
    """GRPO's update: mu steps of the clipped objective with the k3 KL to pi_ref, on the kept
    completions (all unless drop_zero_std) -> (stats: loss, kl, clip_frac, entropy; loads)."""
    ctx = autocast(cfg, device)
    prompt_tok, prompt_mask = pad_left(prompts, EOT, device)            # prompt, then completion
    tokens = torch.cat([prompt_tok, comps], 1)
    key_mask = torch.cat([prompt_mask, torch.ones_like(comp_mask)], 1)
    rows, share_rows, share_tok = grpo_rank_shares(keep, comp_mask, device, world)
    stats, loads = {"clip_frac": 0.0, "kl": 0.0, "loss": 0.0, "entropy": 0.0}, None
    if rows is None:   # no rank kept a completion: no update this step
        return stats, loads
    inputs = (tokens[rows], key_mask[rows], prompt_tok.size(1), comp_mask[rows], ctx)
    mask, adv = comp_mask[rows], advantages.to(device)[rows]
    with torch.no_grad():
        ref_logp = sequence_logprobs(ref, *inputs)[0] if cfg.beta else None
        old_logp = sequence_logprobs(model, *inputs)[0] if cfg.mu > 1 else None   # pi_old, frozen
    model.train(share_rows > 0)    # a stand-in row at weight 0 counts no router loads
    for _ in range(cfg.mu):
        logp, entropy, aux = sequence_logprobs(ddp, *inputs)
        # mu = 1: pi_old is pi_theta itself, so the ratio is 1 and its gradient that of logp
        old = logp.detach() if old_logp is None else old_logp
        loss, stats = grpo_loss(logp, old, ref_logp, adv, mask, cfg.clip_low, cfg.clip_high,
                                cfg.beta, cfg.agg, cfg.max_new_tokens)
        loss = loss * (share_tok if cfg.agg == "token" else share_rows)   # see grpo_rank_shares
        (loss + aux * share_rows).backward()
        clipped_step(cfg, model, opt, cfg.grpo_lr, loss.item(), "grpo", step, cfg.grpo_steps,
                     "--grpo_lr")
        loads = model.update_router_biases()
        stats["loss"] = loss.item()
    # per-token means, weighted by this rank's share of the kept tokens for the mean over ranks
    stats.update(kl=stats["kl"] * share_tok, clip_frac=stats["clip_frac"] * share_tok,
                 entropy=masked_mean(entropy.detach(), mask).item() * share_tok)
    return stats, loads


def grpo(cfg: Config, model: Transformer, ref: Transformer, device, rank: int, world: int,
         tests: dict, history: list, reward_fn=None, resume: dict = None, max_seconds: float = 0):
    """Train model with GRPO against the frozen ref, each step's record appended to history.
    reward_fn(text, problem) -> float replaces the R1-Zero reward (tests); resume: a checkpoint to
    continue from; max_seconds > 0: stop after the step that reaches this wall time."""
    n_prompts, G, total = cfg.prompts_per_step // world, cfg.group_size, cfg.grpo_steps
    gen = torch.Generator(device=device)
    # the head faster: the first token's choice (think or answer) moves by at most ~lr per weight
    opt = make_optimizer(model, cfg.grpo_lr, 0.0, device,
                         lr_mult={"head.weight": cfg.grpo_head_lr_mult})
    start = restore_optimizer(opt, resume)
    ddp = wrap_ddp(model, device)
    ref.eval().requires_grad_(False)
    print0(report.grpo_banner(cfg, max_seconds))
    progress = Progress(cfg, "grpo", total, 1, start, digits=3, max_seconds=max_seconds)
    with training_loop():
        for step in range(start, total):
            # 1) G completions per prompt (each rank owns whole groups) from pi_old, the policy as
            # it is now. They depend on (seed, step, rank) alone: a resumed run draws the same
            t0 = time.time()
            rng = random.Random(f"{cfg.seed}-grpo-{step}-{rank}")
            problems = [p for p in draw_problems(rng, n_prompts, list(tests)) for _ in range(G)]
            gen.manual_seed(rng.getrandbits(63))
            prompts = [prompt_tokens(p) for p in problems]
            model.eval()   # pi_old: its samples and log-probs count no router loads
            comps, comp_mask, truncated = generate(model, prompts, cfg.max_new_tokens,
                                                   cfg.temperature, cfg.top_k, generator=gen,
                                                   autocast_ctx=autocast(cfg, device))
            texts = [completion_text(c) for c in comps]
            # 2) score each completion: R1-Zero's rule-based reward (or the caller's)
            acc = torch.tensor([accuracy_reward(t, p.answer) for t, p in zip(texts, problems)])
            fmt = torch.tensor([format_reward(t) for t in texts])
            rewards = cfg.acc_weight * acc + cfg.format_weight * fmt
            if reward_fn is not None:
                rewards = torch.tensor([float(reward_fn(t, p)) for t, p in zip(texts, problems)])
            # 3) group-relative advantages; a group whose rewards are all equal carries no signal
            advantages = group_advantages(rewards, G, scale_by_std=cfg.scale_by_std)
            zero_std = rewards.view(-1, G).std(1) == 0
            keep = ~zero_std.repeat_interleave(G) if cfg.drop_zero_std else \
                torch.ones(len(texts), dtype=torch.bool)
            t_gen, t0 = time.time() - t0, time.time()
            # 4) mu policy updates
            stats, loads = policy_update(cfg, model, ddp, ref, opt, prompts, comps, comp_mask,
                                         advantages, keep, step + 1, device, world)
            # 5) log the step (means over all ranks), evaluate now and then, checkpoint
            lengths = response_lengths(comp_mask, truncated)
            t_upd = time.time() - t0
            rec = report.grpo_record(step + 1, rewards, acc, fmt, lengths, texts, zero_std,
                                     truncated, stats, loads, t_gen, t_upd, device, world)
            rec["reflection"] = report.sampled_reflection(problems, texts, list(tests), device)
            last = step + 1 == total or progress.out_of_time()
            progress.line(step + 1, report.grpo_fields(rec), last=last)
            look = cfg.grpo_eval_every and (step + 1) % cfg.grpo_eval_every == 0
            if look and not last:   # the last step's look is the caller's evaluation of the result
                held = rec["heldout"] = evaluate(model, subset(tests, cfg.grpo_eval_n), cfg, device)
                print0(f"  held-out (greedy, {cfg.grpo_eval_n}/level): " + levels_line(held))
            if look or last:
                rec["samples"] = report.group_samples(problems, texts, rewards, acc, advantages, G)
            log_metrics(cfg, rec)
            history.append(rec)
            checkpoint_or_stop(cfg, model, opt, "grpo", step + 1, step + 1 if last else total,
                               cfg.grpo_ckpt_every, rank, device)
            if last:
                break
    return model


# -----------------------------------------------------------------------------
# The rest of the R1 recipe (DeepSeek-R1 sec 2.3): RL between rounds of supervised fine-tuning.
#   1. cold start: SFT of the base on a few readable worked solutions (2.3.1); 2. reasoning RL,
#   GRPO as in R1-Zero (2.3.2); 3. rejection sampling from that RL model: keep its correct samples
#   and fine-tune the *base* on them for two epochs (2.3.3); 4. RL again (2.3.4).
# Simplified: the cold-start data are data/arith.py's worked solutions (R1's: thousands of long
# CoTs refined by people); stage 3 keeps reasoning data only, filtered by the R1-Zero rewards, not
# R1's readability filters; stage 4 keeps the rule-based reward (no reward models). These stages
# run in one process, do not resume, write into out_dir/<stage>/ and merge into summary.json.

def sft_loss(model, x, y, autocast_ctx):
    """Mean cross-entropy over the completion tokens of the batch (targets -1 are skipped), and
    the model's balance loss."""
    with autocast_ctx:
        logits, aux = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
    return loss, aux


def sft(cfg: Config, model: Transformer, examples: list, steps: int, lr: float, device,
        name: str = "sft"):
    """Supervised fine-tuning in place on (prompt tokens, completion tokens) pairs, the loss on
    the completions only. Each step takes sft_batch examples, epoch after epoch in a seeded
    shuffle; AdamW with warmup (a tenth of the steps, at most warmup_steps) and cosine decay."""
    opt = make_optimizer(model, lr, cfg.weight_decay, device)
    schedule = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, steps // 10),
                                   decay_frac=1.0)
    batches = epoch_batches(examples, cfg.sft_batch, random.Random(f"{cfg.seed}-{name}"), name)
    print0(f"{name}: {len(examples)} examples, {steps} steps x {cfg.sft_batch}, lr {lr}, "
           f"completion tokens only")
    model.train()
    progress, losses = Progress(cfg, name, steps, max(1, min(cfg.log_every, steps // 10))), []
    for step in range(steps):
        lr_now = lr_at(step, steps, schedule, lr)
        x, y = (t.to(device) for t in sft_rows(next(batches), EOT))   # completions are targets
        loss, aux = sft_loss(model, x, y, autocast(cfg, device))
        (loss + aux).backward()
        clipped_step(cfg, model, opt, lr_now, loss.item(), name, step + 1, steps, "--sft_lr")
        model.update_router_biases()
        losses.append(loss.item())
        if progress.due(step + 1):
            report.log_sft_step(cfg, progress, name, step + 1, losses, lr_now)
            losses = []
    return model


def fine_tune(cfg: Config, model: Transformer, records: list, device, name: str):
    """sft() on {prompt, completion} text records for sft_epochs epochs (R1: two)."""
    examples = [(prompt_tokens(r["prompt"]), encode(r["completion"]) + [EOT]) for r in records]
    steps = math.ceil(cfg.sft_epochs * len(examples) / cfg.sft_batch)
    return sft(cfg, model, examples, steps, cfg.sft_lr, device, name)


@torch.no_grad()
def rejection_sample(cfg: Config, model: Transformer, problems: list, k: int, device,
                     seed: int = 0, path: str = "") -> list:
    """R1's rejection sampling (sec 2.3.3): k sampled completions per problem, kept iff right and
    well formed (accuracy and format reward both 1), each distinct (problem, completion) once.
    -> {level, problem, answer, prompt, completion} records, also written to path."""
    only_training(problems, "rejection sampling")   # a held-out one would leak the test set
    gen = torch.Generator(device=device).manual_seed(seed)
    kept, seen, right = [], set(), 0
    per_batch = max(1, cfg.eval_batch // k)                  # problems per generation batch
    for i in range(0, len(problems), per_batch):
        chunk = problems[i:i + per_batch]
        comps, _, _ = generate(model, [prompt_tokens(p) for p in chunk for _ in range(k)],
                               cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator=gen,
                               autocast_ctx=autocast(cfg, device))
        for j, comp in enumerate(comps):
            p, text = chunk[j // k], completion_text(comp)
            if accuracy_reward(text, p.answer) == 1.0 and format_reward(text) == 1.0:
                right += 1
                if (p.text, text) not in seen:
                    seen.add((p.text, text))
                    kept.append(p.record(text))
    print0(f"rejection sampling: {len(problems)} problems x {k} samples: {right} right and well "
           f"formed, {len(kept)} distinct kept")
    if path:
        write_jsonl(path, kept)
    return kept


def finish_stage(cfg: Config, name: str, seconds: float, model, tests, device, save=True, **extra):
    """Save the stage's model (cfg.out_dir/model.pt), measure it -> its summary record."""
    if save:
        save_checkpoint(os.path.join(cfg.out_dir, "model.pt"), model, cfg, stage=name)
    return report.stage_record(cfg, name, seconds, evaluate(model, tests, cfg, device), **extra)


def run_sft(cfg: Config, device, tests: dict):
    """--stage sft: fine-tune --init_from (default out_dir/base.pt) on --sft_data, or on
    cold_start worked solutions -> out_dir/sft/model.pt."""
    model, _, _ = load_stage_model(cfg, device, "base.pt")
    sub, t0 = stage_cfg(cfg, "sft"), time.time()
    if cfg.sft_data:
        records = read_sft_data(cfg.sft_data, is_heldout)
    else:   # the cold-start data, kept beside the model
        records = worked_solutions(cfg.cold_start, cfg.seed)
        write_jsonl(os.path.join(sub.out_dir, "cold_start.jsonl"), records)
    fine_tune(sub, model, records, device, "sft")
    return [finish_stage(sub, "sft", time.time() - t0, model, tests, device,
                         examples=len(records))], {}


def run_rejection(cfg: Config, device, tests: dict):
    """--stage rejection: rs_samples completions for each of rs_prompts fresh training problems
    from --init_from (default out_dir/final.pt) -> out_dir/rejection/traces.jsonl (--sft_data)."""
    model, _, _ = load_stage_model(cfg, device, "final.pt")
    sub, t0 = stage_cfg(cfg, "rejection"), time.time()
    problems = draw_problems(random.Random(f"{cfg.seed}-rejection"), cfg.rs_prompts)   # fresh ones
    traces = rejection_sample(cfg, model, problems, cfg.rs_samples, device, cfg.seed,
                              os.path.join(sub.out_dir, "traces.jsonl"))
    return [finish_stage(sub, "rejection", time.time() - t0, model, tests, device, save=False,
                         samples=cfg.rs_prompts * cfg.rs_samples, kept=len(traces))], {}


def run_r1(cfg: Config, device, tests: dict):
    """--stage r1: DeepSeek-R1's four stages from the pretrained base (--init_from, default
    out_dir/base.pt), each in out_dir/r1/<stage>/; each RL stage runs r1_grpo_steps GRPO steps."""
    base, _, _ = load_stage_model(cfg, device, "base.pt")
    stages = []
    # 1) cold start: SFT on worked solutions, so that RL starts from a model that already thinks
    sub, t0 = stage_cfg(cfg, "r1", "cold_start_sft"), time.time()
    model, records = copy.deepcopy(base), worked_solutions(cfg.cold_start, cfg.seed)
    write_jsonl(os.path.join(sub.out_dir, "cold_start.jsonl"), records)
    fine_tune(sub, model, records, device, "cold_start_sft")
    stages.append(finish_stage(sub, "cold_start_sft", time.time() - t0, model, tests, device,
                               examples=len(records)))

    def rl(name, model):   # 2) and 4): GRPO against the frozen stage's starting model
        sub, t0 = stage_cfg(cfg, "r1", name, grpo_steps=cfg.r1_grpo_steps), time.time()
        grpo(sub, model, copy.deepcopy(model), device, 0, 1, tests, [])
        stages.append(finish_stage(sub, name, time.time() - t0, model, tests, device,
                                   steps=cfg.r1_grpo_steps))
    rl("reasoning_rl", model)
    # 3) rejection sampling from the RL model; SFT of the base on the traces (R1 fine-tunes V3-Base)
    sub, t0 = stage_cfg(cfg, "r1", "rejection_sft"), time.time()
    problems = draw_problems(random.Random(f"{cfg.seed}-r1-rejection"), cfg.rs_prompts)
    traces = rejection_sample(cfg, model, problems, cfg.rs_samples, device, cfg.seed,
                              os.path.join(sub.out_dir, "traces.jsonl"))
    model = copy.deepcopy(base)
    fine_tune(sub, model, traces, device, "rejection_sft")
    stages.append(finish_stage(sub, "rejection_sft", time.time() - t0, model, tests, device,
                               samples=cfg.rs_prompts * cfg.rs_samples, examples=len(traces)))
    rl("final_rl", model)
    return stages, {}


# -----------------------------------------------------------------------------
# Distillation (DeepSeek-R1 sec 2.4 and 4.1): small models fine-tuned on the strong model's
# rejection-sampled traces, with SFT alone, beat the same small models trained with RL.

def run_distill(cfg: Config, device, tests: dict):
    """--stage distill, R1 sec 4.1 in miniature: a small student, from its own pretrained base,
    (a) trained with GRPO for as long as (b), fine-tuning it on the teacher's rejection-sampled
    traces, takes to sample them and fine-tune (the teacher's training is not counted, as in the
    paper). Teacher: --init_from, default out_dir/final.pt. Writes out_dir/distill/<stage>/."""
    teacher, teacher_path, _ = load_stage_model(cfg, device, "final.pt")
    torch.manual_seed(cfg.seed)
    base = Transformer(student_config(teacher.cfg, cfg.student_dim, cfg.student_layers)).to(device)
    print0(f"student: {report.params(base)}, teacher {teacher.num_params() / 1e6:.2f}M")
    stages = []
    # the student's base: pretrain() on the teacher's corpus, for student_pretrain_steps
    sub = stage_cfg(cfg, "distill", "student_base",
                    pretrain_steps=cfg.student_pretrain_steps or cfg.pretrain_steps)
    t0 = time.time()
    pretrain(sub, base, device, 0, 1, tests)
    stages.append(finish_stage(sub, "student_pretrain", time.time() - t0, base, tests, device))
    # (b) distillation: the teacher's traces for fresh training problems, then SFT of the student
    sub, t0 = stage_cfg(cfg, "distill", "teacher_traces"), time.time()
    problems = draw_problems(random.Random(f"{cfg.seed}-distill-rejection"), cfg.rs_prompts)
    traces = rejection_sample(cfg, teacher, problems, cfg.rs_samples, device, cfg.seed,
                              os.path.join(sub.out_dir, "traces.jsonl"))
    t_traces = time.time() - t0
    stages.append(finish_stage(sub, "teacher_traces", t_traces, teacher, tests, device, save=False,
                               samples=cfg.rs_prompts * cfg.rs_samples, kept=len(traces)))
    sub, t0 = stage_cfg(cfg, "distill", "student_distilled"), time.time()
    distilled = fine_tune(sub, copy.deepcopy(base), traces, device, "student_sft")
    t_sft = time.time() - t0
    stages.append(finish_stage(sub, "student_sft", t_sft, distilled, tests, device,
                               examples=len(traces)))
    # (a) RL alone, from the same base, for the same wall time (no evaluations inside it)
    budget = 0 if cfg.student_grpo_steps else t_traces + t_sft
    sub = stage_cfg(cfg, "distill", "student_rl", grpo_eval_every=0,
                    grpo_steps=cfg.student_grpo_steps or 100_000)      # the budget stops it
    rl, history = copy.deepcopy(base), []
    grpo(sub, rl, copy.deepcopy(base), device, 0, 1, tests, history, max_seconds=budget)
    t_rl = sum(h["t_gen"] + h["t_update"] for h in history)             # its steps' own time
    stages.append(finish_stage(sub, "student_grpo", t_rl, rl, tests, device, steps=len(history)))
    result = report.distill_result(stages, base, teacher, teacher_path, len(traces), len(history),
                                   t_rl, t_traces + t_sft)
    return stages, {"distill": result}


# -----------------------------------------------------------------------------
# main: R1-Zero is pretraining, a look at the base, GRPO from the base, a look at the result.

RECIPE = {"sft": run_sft, "rejection": run_rejection, "distill": run_distill, "r1": run_r1}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    remember_resume_flags(cfg, argv)
    rank, world, device = setup(cfg)
    if cfg.stage in MODEL_STAGES:   # the trained model, outside training: export it, or ask it
        return export_hf(cfg, EOT) if cfg.stage == "export" else ask(cfg, device)
    prepare_out_dir(cfg, rank)
    # --resume: read and check the checkpoint before anything runs or is written
    resume, resume_grpo = read_resume_checkpoint(cfg, device, enc.n_vocab)   # 2nd: GRPO's, or None
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tests = test_set(cfg.n_test, levels=run_levels(cfg)[0])
    wall, t0 = {}, time.time()
    if cfg.stage in RECIPE_STAGES:   # the rest of the R1 recipe, in one process (see validate)
        print0(report.recipe_banner(cfg, device))
        stages, extra = RECIPE[cfg.stage](cfg, device, tests)
        return report.finish_recipe(cfg, stages, extra, time.time() - t0)
    start_metrics(cfg, resume, rank)
    print0(f"nanor1 | device {device} | world {world} | seed {cfg.seed} | out {cfg.out_dir}/")

    # 1) pretraining, or the base model an earlier run pretrained
    if cfg.stage in ("all", "pretrain") and not resume_grpo:
        model = Transformer(dataclasses.replace(cfg.model, vocab_size=enc.n_vocab)).to(device)
        if resume:
            model.load_state_dict(resume["model"])
        pretrain(cfg, model, device, rank, world, tests, resume=resume)
        wall["pretrain"] = time.time() - t0
        if rank == 0:
            save_checkpoint(os.path.join(cfg.out_dir, "base.pt"), model, cfg, stage="pretrain",
                            step=cfg.pretrain_steps)
    else:
        model = load_base_model(cfg, device, resume_grpo)

    # 2) the base: it rarely thinks on its own, though thinking would pay (forced to think)
    shown = {"base": [], "final": []}    # its completions and the final model's, for samples.html
    base = evaluate(model, tests, cfg, device, shown=shown["base"])
    print0(f"held-out (greedy, {cfg.n_test}/level) before GRPO: " + levels_line(base))
    sampled = evaluate(model, subset(tests, 100), cfg, device, greedy=False, seed=cfg.seed)
    print0(f"held-out (sampled T={cfg.temperature}, 100/level):  " + levels_line(sampled))
    forced = {f: evaluate(model, subset(tests, 100), cfg, device, force=f)
              for f in ("think", "answer")}
    print0("held-out (greedy, 100/level) forced to think:    " + levels_line(forced["think"]))
    print0("held-out (greedy, 100/level) forced to answer:   " + levels_line(forced["answer"]))
    # reflection shows in sampled worked solutions (data/reflect.py; greedy ones are plain), in
    # runs whose corpus has it (bash aha.sh); GRPO logs it at every step in every run
    aha = cfg.verify_frac + cfg.retry_frac + cfg.edge_weight > 0
    sampled_think = lambda m: evaluate(m, subset(tests, 100), cfg, device, False, cfg.seed, "think")
    reflection = {"base": sampled_think(model)} if aha else {}

    # 3) GRPO from the base, with the base frozen as the KL reference; then the result
    final = None
    if cfg.stage in ("all", "grpo"):
        t1, ref = time.time(), copy.deepcopy(model)
        if resume_grpo:
            model.load_state_dict(resume_grpo["model"])
        grpo(cfg, model, ref, device, rank, world, tests, [], resume=resume_grpo)
        wall["grpo"] = time.time() - t1
        if rank == 0:
            save_checkpoint(os.path.join(cfg.out_dir, "final.pt"), model, cfg, stage="grpo",
                            step=cfg.grpo_steps)
        final = evaluate(model, tests, cfg, device, shown=shown["final"])
        print0(f"held-out (greedy, {cfg.n_test}/level) after GRPO:  " + levels_line(final))
        if aha:
            reflection["final"] = sampled_think(model)
    wall["total"] = time.time() - t0
    if rank == 0:
        report.finish_r1_zero(cfg, wall, base, sampled, forced, final, shown, reflection)
    teardown()


if __name__ == "__main__":
    install_signal_handlers()   # Ctrl-C finishes the training step and saves (plumbing.py)
    main()
