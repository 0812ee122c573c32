"""
report.py -- what nanor1 shows of a run: progress fields, result tables, out/summary.json, the
plots in out/nanor1.png, what the model wrote in out/samples.html, and --stage sample's lines.
Nothing in this file is R1: start with nanor1.py.
"""
import contextlib
import html
import json
import os
import re

import torch

from data import ALL_LEVELS, EDGE_LEVEL, LEVELS, OUTSIDE, is_heldout
from data.reflect import COUNT_FIELDS, RATE_FIELDS, counts_vector, reflection_rates
from plumbing import (all_reduce_sum, atomic_write, fmt_time, log_metrics, mfu, peak_memory_gb,
                      print0, write_json)


def levels_line(res: dict) -> str:
    """An evaluation in one line: accuracy per level, then think rate and length overall."""
    return " | ".join(f"{k} {v['accuracy']:.2f}" for k, v in res.items()) + \
        f" | think {res['overall']['think_rate']:.2f} | len {res['overall']['mean_length']:.1f}"


def _overall_rows(levels: list) -> list:
    """The rows that "overall" sums: R1-Zero's four levels (the edge level is reported on its own),
    or all of them when none of the four is there."""
    rows = [i for i, lvl in enumerate(levels) if lvl in LEVELS]
    return rows or list(range(len(levels)))


def level_rates(sums: torch.Tensor, levels: list) -> dict:
    """sums (levels, 5 + COUNT_FIELDS): n, correct, think, length, format, then the reflection
    counts, per level -> {level, "overall" (R1-Zero's levels), then the edge level: {accuracy,
    think_rate, mean_length, format, reflection: {RATE_FIELDS}}}."""
    def rates(s):
        n = max(s[0].item(), 1)
        return {"accuracy": s[1].item() / n, "think_rate": s[2].item() / n,
                "mean_length": s[3].item() / n, "format": s[4].item() / n,
                "reflection": reflection_rates(dict(zip(COUNT_FIELDS, s[5:].long().tolist())))}
    rows = _overall_rows(levels)
    res = {levels[i]: rates(sums[i]) for i in rows}
    res["overall"] = rates(sums[rows].sum(0))
    res.update({lvl: rates(sums[i]) for i, lvl in enumerate(levels) if i not in rows})
    return res


def levels_summary(res: dict) -> dict:
    return {k: {"accuracy": v["accuracy"], "think_rate": v["think_rate"],
                "mean_length": v["mean_length"]} for k, v in res.items()}


def sampled_reflection(problems: list, texts: list, levels: list, device) -> dict:
    """Reflection in a GRPO step's sampled completions, per level and overall, over all ranks."""
    sums = torch.zeros(len(levels), 5 + len(COUNT_FIELDS), dtype=torch.float64)
    for p, text in zip(problems, texts):
        sums[levels.index(p.level), 5:] += torch.tensor(counts_vector(text), dtype=torch.float64)
    sums[:, 0] = 1   # level_rates' n: unused here
    res = level_rates(all_reduce_sum(sums.to(device)).cpu(), levels)
    return {k: v["reflection"] for k, v in res.items()}


def reflection_table(before: dict, after: dict) -> str:
    """Per level, the base and the final model forced to think: accuracy, length, then the
    reflection rates as data/reflect.py defines them ("-": no cases)."""
    short = {"reflect_rate": "reflect", "catch_rate": "catch", "false_alarm_rate": "false-alarm",
             "fix_rate": "fix", "verdict_acc": "verdict", "keyword_rate": "keyword"}
    lines = [f"{'level':<8} {'model':<5} {'acc':>5} {'len':>6} "
             + " ".join(f"{short[f]:>11}" for f in RATE_FIELDS)]
    for k in before:
        for name, res in (("base", before), ("final", after)):
            if res and k in res:
                r = res[k]["reflection"]
                lines.append(f"{k:<8} {name:<5} {res[k]['accuracy']:5.2f} "
                             f"{res[k]['mean_length']:6.1f} " + " ".join(
                                 f"{'-' if r[f] is None else format(r[f], '.2f'):>11}"
                                 for f in RATE_FIELDS))
    return "\n".join(lines)


def params(model) -> str:
    return (f"{model.num_params() / 1e6:.2f}M params "
            f"({model.num_params(active=True) / 1e6:.2f}M active)")


def pretrain_banner(cfg, model) -> str:
    return (f"pretraining: {params(model)}, {cfg.pretrain_steps} steps x "
            f"{cfg.batch_size * cfg.block_size} tokens, think_frac {cfg.think_frac}, "
            f"levels {cfg.level_weights} ({','.join(LEVELS)})"
            + (f", edge level {EDGE_LEVEL} x{cfg.edge_weight:g}" if cfg.edge_weight else "")
            + (f", reflective: verify {cfg.verify_frac:g} retry {cfg.retry_frac:g}"
               if cfg.verify_frac or cfg.retry_frac else ""))


def log_pretrain_step(cfg, progress, step: int, losses: list, lr: float, loads, device, world):
    """The progress line and metrics record of pretraining: the mean loss of the steps since the
    last line (over all ranks), throughput, MFU, and how unevenly the experts were loaded (loads:
    (MoE layers, experts) tokens per expert in the last step; max/mean 1.00 = balanced)."""
    dt = progress.seconds_per_step(step)
    loss = all_reduce_sum(torch.tensor(sum(losses) / len(losses), device=device)).item() / world
    tok_s = progress.tokens_per_step / dt
    busiest = (loads.max(1).values / loads.mean(1).clamp_min(1)).mean().item() \
        if loads.numel() else 0
    util = mfu(progress.flops_per_token, tok_s, world, progress.peak)
    progress.line(step, f"loss {loss:.3f} | lr {lr:.1e} | {1000 * dt:.0f}ms | "
                        f"{tok_s / 1e3:.1f}k tok/s | mfu {util} | expert max/mean {busiest:.2f}")
    log_metrics(cfg, {"stage": "pretrain", "step": step, "loss": loss, "lr": lr, "tok_s": tok_s,
                      "expert_load": loads.tolist(), "peak_mem_gb": peak_memory_gb(device)})


def log_sft_step(cfg, progress, name: str, step: int, losses: list, lr: float):
    """A fine-tuning stage's progress line and metrics record: the mean loss since the last."""
    dt, loss = progress.seconds_per_step(step), sum(losses) / len(losses)
    progress.line(step, f"loss {loss:.3f} | lr {lr:.1e} | {1000 * dt:.0f}ms")
    log_metrics(cfg, {"stage": name, "step": step, "loss": loss, "lr": lr})


def recipe_banner(cfg, device) -> str:
    return (f"nanor1 | stage {cfg.stage} | device {device} | seed {cfg.seed} | "
            f"out {cfg.out_dir}/{cfg.stage}/")


def grpo_banner(cfg, max_seconds: float) -> str:
    return (f"GRPO: {'up to ' if max_seconds else ''}{cfg.grpo_steps} steps x "
            f"{cfg.prompts_per_step} prompts x G={cfg.group_size}, lr {cfg.grpo_lr}, "
            f"beta {cfg.beta}, clip [{1 - cfg.clip_low:.2f}, {1 + cfg.clip_high:.2f}], "
            f"agg {cfg.agg}"
            + (f", stopping after {max_seconds:.0f}s of wall time" if max_seconds else ""))


GRPO_KEYS = ["reward", "acc", "fmt", "length", "think", "kl", "clip_frac", "entropy", "zero_std",
             "truncated", "loss"]


def grpo_record(step: int, rewards, acc, fmt, lengths, texts, zero_std, truncated, stats: dict,
                loads, t_gen: float, t_update: float, device, world: int) -> dict:
    """GRPO's record of a step: GRPO_KEYS, each the mean over all ranks (every rank holds as many
    completions; kl, clip_frac and entropy come in weighted by the rank's token share), then
    the step, its times and the expert loads."""
    think = torch.tensor([t.startswith("<think>") for t in texts], dtype=torch.float)
    m = torch.tensor([rewards.mean(), acc.mean(), fmt.mean(), lengths.float().mean().item(),
                      think.mean(), stats["kl"], stats["clip_frac"], stats["entropy"],
                      zero_std.float().mean(), truncated.float().mean().item(), stats["loss"]],
                     dtype=torch.float64)
    m = (all_reduce_sum(m.to(device)) / world).cpu().tolist()
    rec = dict(zip(GRPO_KEYS, m), stage="grpo", step=step, t_gen=t_gen, t_update=t_update,
               peak_mem_gb=peak_memory_gb(device))
    if loads is not None and loads.numel():
        rec["expert_load"] = loads.tolist()
    return rec


def grpo_fields(rec: dict) -> str:
    refl = rec.get("reflection", {}).get("overall", {}).get("reflect_rate")
    return (f"reward {rec['reward']:.2f} (acc {rec['acc']:.2f} fmt {rec['fmt']:.2f}) | "
            f"len {rec['length']:5.1f} | think {rec['think']:.2f} | "
            + (f"refl {refl:.2f} | " if refl is not None else "") + f"kl {rec['kl']:.3f} | "
            f"clip {rec['clip_frac']:.3f} | ent {rec['entropy']:.2f} | "
            f"zero-std {rec['zero_std']:.2f} | trunc {rec['truncated']:.2f} | "
            f"gen {rec['t_gen']:.1f}s train {rec['t_update']:.1f}s")


def stage_record(cfg, name: str, seconds: float, res: dict, **extra) -> dict:
    """An R1-recipe stage's record for the summary, from its held-out evaluation res (printed)."""
    print0(f"{name} ({fmt_time(seconds)}): held-out (greedy, {cfg.n_test}/level): "
           + levels_line(res))
    return {"name": name, "wall_seconds": seconds, "heldout": levels_summary(res), **extra}


def distill_result(stages: list, student, teacher, teacher_path: str, traces: int, rl_steps: int,
                   rl_seconds: float, distilled_seconds: float) -> dict:
    """--stage distill's comparison, for summary.json (printed): held-out results per model."""
    heldout = {s["name"]: s["heldout"] for s in stages}
    result = dict(student_rl=heldout["student_grpo"], student_distilled=heldout["student_sft"],
                  teacher=heldout["teacher_traces"], student_base=heldout["student_pretrain"],
                  student_params=student.num_params(), teacher_params=teacher.num_params(),
                  student_rl_seconds=rl_seconds, student_rl_steps=rl_steps,
                  student_distilled_seconds=distilled_seconds, traces=traces,
                  teacher_checkpoint=teacher_path)
    print0(distill_line(result))
    return result


def distill_line(r: dict) -> str:
    acc = lambda levels: f"{levels['overall']['accuracy']:.2f}"
    return (f"\nstudent ({r['student_params'] / 1e6:.2f}M params, teacher "
            f"{r['teacher_params'] / 1e6:.2f}M), held-out accuracy: "
            f"base {acc(r['student_base'])} | "
            f"RL {acc(r['student_rl'])} ({r['student_rl_steps']} GRPO steps, "
            f"{fmt_time(r['student_rl_seconds'])}) | distilled {acc(r['student_distilled'])} "
            f"({r['traces']} traces, {fmt_time(r['student_distilled_seconds'])}) | "
            f"teacher {acc(r['teacher'])}")


def summary_table(base: dict, final: dict) -> str:
    lines = [f"{'level':<8} {'acc base':>9} {'acc final':>9} {'think base':>10} "
             f"{'think final':>11} {'len base':>8} {'len final':>9}"]
    for k in base:
        b, f = base[k], final.get(k, {}) if final else {}
        g = lambda d, key, spec: format(d[key], spec) if key in d else "-"
        lines.append(f"{k:<8} {g(b, 'accuracy', '9.2f')} {g(f, 'accuracy', '9.2f')} "
                     f"{g(b, 'think_rate', '10.2f')} {g(f, 'think_rate', '11.2f')} "
                     f"{g(b, 'mean_length', '8.1f')} {g(f, 'mean_length', '9.1f')}")
    return "\n".join(lines)


def stages_table(stages: list) -> str:
    """Held-out greedy accuracy per level after each stage, then think rate and length overall."""
    levels = list(stages[0]["heldout"])
    lines = [f"{'stage':<17} {'wall':>6} " + " ".join(f"{k:>7}" for k in levels) +
             f" {'think':>6} {'len':>6}"]
    for s in stages:
        h = s["heldout"]
        lines.append(f"{s['name']:<17} {fmt_time(s['wall_seconds']):>6} " +
                     " ".join(f"{h[k]['accuracy']:7.2f}" for k in levels) +
                     f" {h['overall']['think_rate']:6.2f} {h['overall']['mean_length']:6.1f}")
    return "\n".join(lines)


def finish_r1_zero(cfg, wall: dict, base: dict, sampled: dict, forced: dict, final,
                   shown: dict = None, reflection: dict = None):
    """Rank 0 at the end of an R1-Zero run: out_dir/summary.json, the plots, the tables, and
    samples.html (shown: the base's and the final model's held-out completions, see evaluate;
    reflection: {"base", "final"}: their evaluations sampled and forced to think)."""
    reflection = reflection or {}
    summary = {"seed": cfg.seed, "wall_seconds": wall, "base": levels_summary(base),
               "base_sampled": levels_summary(sampled),
               "base_forced_think": levels_summary(forced["think"]),
               "base_forced_answer": levels_summary(forced["answer"])}
    if final:
        summary["final"] = levels_summary(final)
    # within worked solutions: the base and the final model, forced to think and sampled, alike
    # (runs with reflective data or the edge level; main skips them in the others)
    if reflection:
        summary["reflection"] = {m: {k: dict(v["reflection"], accuracy=v["accuracy"],
                                             mean_length=v["mean_length"])
                                     for k, v in res.items()} for m, res in reflection.items()}
        summary["reflection"]["decoding"] = (f"sampled T={cfg.temperature}, forced to think, "
                                             "100/level")
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    make_plots(cfg, base, final, reflection)
    write_samples_page(cfg, shown or {})
    print0("\n" + summary_table(base, final or {}))
    if reflection:
        print0(f"\nreflection within worked solutions (sampled T={cfg.temperature}, forced to "
               f"think, 100/level; data/reflect.py):\n"
               + reflection_table(reflection["base"], reflection.get("final")))
    print0("\nwall time: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in wall.items()) +
           f" | wrote {cfg.out_dir}/summary.json, {cfg.out_dir}/nanor1.png, "
           f"{cfg.out_dir}/samples.html")


def finish_recipe(cfg, stages: list, extra: dict, seconds: float):
    """At the end of an R1-recipe stage: its results merged into summary.json, and its table."""
    merge_summary(cfg, cfg.stage, stages, **extra)
    print0("\n" + stages_table(stages))
    print0(f"\nwall time {fmt_time(seconds)} | wrote {cfg.out_dir}/{cfg.stage}/, "
           f"{cfg.out_dir}/summary.json")


def merge_summary(cfg, pipeline: str, stages: list, **extra):
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
    summary["stages"] = [s for s in summary.get("stages", []) if s.get("pipeline") != pipeline]
    summary["stages"] += stages
    summary.update(extra)
    write_json(path, summary)


def read_metrics(out_dir: str) -> list:
    """The records of out_dir/metrics.jsonl (none if there is no file), skipping a line a kill cut
    short: what the plots and samples.html are drawn from."""
    path, records = os.path.join(out_dir, "metrics.jsonl"), []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if isinstance(r, dict) and "stage" in r:
                    records.append(r)
    return records


def smooth_rates(ys: list, k: int = 10) -> list:
    """A running mean over the last k values that exist (None: a step without a case)."""
    out = []
    for i in range(len(ys)):
        window = [y for y in ys[max(0, i - k + 1):i + 1] if y is not None]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def reflection_panels(samples_ax, bars_ax, rl: list, reflection: dict, level: str):
    """The aha-moment panels, on the edge level if the run has one, else overall: within worked
    solutions, how often the model reflects, catches its own wrong claims, flags right ones and
    fixes what it flags, over GRPO steps (its samples, with their mean length); then the same
    rates for the base and the final model, sampled and forced to think (summary.json)."""
    names = {"reflect_rate": "reflect", "catch_rate": "catch", "false_alarm_rate": "false alarm",
             "fix_rate": "fix", "verdict_acc": "verdict acc"}
    steps = [r["step"] for r in rl]
    samples_ax.plot(steps, smooth_rates([r["length"] for r in rl]), color="gray",
                    label="mean length")
    samples_ax.set(title=f"aha: reflection in sampled worked solutions ({level})",
                   xlabel="GRPO step", ylabel="tokens (all levels)")
    samples_ax.legend(loc="upper left")
    tw = samples_ax.twinx()
    for field, name in list(names.items())[:3]:   # fix and verdict: too few cases a step
        ys = [r.get("reflection", {}).get(level, {}).get(field) for r in rl]
        tw.plot(steps, smooth_rates(ys), label=name, lw=1)
    tw.set(ylabel="rate", ylim=(0, 1.05))
    tw.legend(loc="lower right", fontsize=8)
    xs = range(len(names))
    for k, (model, res) in enumerate(reflection.items()):
        r = res.get(level, {}).get("reflection", {})
        bars_ax.bar([x + 0.4 * k - 0.2 for x in xs], [r.get(f) or 0.0 for f in names], 0.4,
                    label=f"{model} (a missing rate: no cases)")
    bars_ax.set(title=f"aha: reflection, sampled and forced to think ({level})",
                xticks=list(xs), xticklabels=list(names.values()), ylim=(0, 1.05), ylabel="rate")
    if reflection:
        bars_ax.legend(fontsize=8)
    else:
        bars_ax.text(0.5, 0.5, "not measured: this run's corpus has no\nreflective worked "
                     "solutions (bash aha.sh has)", ha="center", transform=bars_ax.transAxes)


def make_plots(cfg, base: dict, final: dict, reflection: dict = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = read_metrics(cfg.out_dir)
    pre = [r for r in recs if r["stage"] == "pretrain"]
    rl = [r for r in recs if r["stage"] == "grpo"]
    ev = [r for r in rl if "heldout" in r]
    fig, grid = plt.subplots(2, 4, figsize=(21, 8.5))
    ax = [grid[0, 0], grid[0, 1], grid[0, 2], grid[1, 0], grid[1, 1], grid[1, 2], grid[0, 3],
          grid[1, 3]]   # R1-Zero's six panels on the left, the aha moment's two on the right
    if pre:
        ax[0].plot([r["step"] for r in pre], [r["loss"] for r in pre])
        ax[0].set(title="pretraining loss", xlabel="step", ylabel="cross-entropy (nats/token)",
                  yscale="log")
    if rl:
        steps = [r["step"] for r in rl]

        ax[1].plot(steps, smooth_rates([r["reward"] for r in rl]), label="train reward")
        ax[1].plot(steps, smooth_rates([r["acc"] for r in rl]), label="train accuracy")
        # held-out greedy evaluations: the base's at GRPO step 0, GRPO's looks, the final model's
        ev_steps = [0] + [r["step"] for r in ev] + ([steps[-1]] if final else [])
        ev_res = [base] + [r["heldout"] for r in ev] + ([final] if final else [])
        ax[1].plot(ev_steps, [r["overall"]["accuracy"] for r in ev_res], "o-",
                   label="held-out accuracy (greedy)")
        ax[1].set(title="GRPO: reward and accuracy", xlabel="GRPO step", ylim=(0, 1.25))
        ax[1].legend()
        ax[2].plot(steps, smooth_rates([r["length"] for r in rl]), color="C3",
                   label="mean response length")
        ax[2].set(title="R1-Zero signature: responses grow (samples)", xlabel="GRPO step",
                  ylabel="tokens")
        tw = ax[2].twinx()
        tw.plot(steps, smooth_rates([r["think"] for r in rl]), color="C2", label="think rate")
        tw.set(ylabel="share of samples that think", ylim=(0, 1.05))
        ax[2].legend(loc="upper left")
        tw.legend(loc="lower right")
        ax[5].plot(ev_steps, [r["overall"]["mean_length"] for r in ev_res], "o-", color="C3",
                   label="mean response length")
        ax[5].set(title="held-out, greedy: length and think rate", xlabel="GRPO step",
                  ylabel="tokens", ylim=(0, None))
        tw = ax[5].twinx()
        tw.plot(ev_steps, [r["overall"]["think_rate"] for r in ev_res], "s--", color="C2",
                label="think rate")
        tw.set(ylabel="share of answers that think", ylim=(0, 1.05))
        ax[5].legend(loc="center right")   # clear of both curves, at the top by then
        tw.legend(loc="lower right")
        edge = next((k for k in base if k not in LEVELS and k != "overall"), "overall")
        reflection_panels(ax[6], ax[7], rl, reflection or {}, edge)
    lv = [k for k in base if k != "overall"] + ["overall"]
    xs = range(len(lv))
    ax[3].bar([x - 0.2 for x in xs], [base[k]["accuracy"] for k in lv], 0.4,
              label="base (before GRPO)")
    if final:
        ax[3].bar([x + 0.2 for x in xs], [final[k]["accuracy"] for k in lv], 0.4,
                  label="after GRPO")
    ax[3].set(title="held-out greedy accuracy per level", xticks=list(xs), xticklabels=lv,
              ylim=(0, 1.05))
    ax[3].legend()
    # expert load over the whole run: pretraining steps, then GRPO steps after them
    rs = [r for r in pre + rl if r.get("expert_load")]
    if rs:
        offset = pre[-1]["step"] if pre else 0
        x = [r["step"] + (offset if r["stage"] == "grpo" else 0) for r in rs]
        loads = torch.tensor([r["expert_load"] for r in rs])                 # (records, layers, E)
        share = loads / loads.sum(-1, keepdim=True).clamp_min(1)
        for layer in range(share.size(1)):
            ax[4].plot(x, (share[:, layer].max(-1).values * share.size(-1)).tolist(),
                       label=f"MoE layer {layer}")
        ax[4].axhline(1.0, color="gray", ls="--")
        if pre and rl:
            ax[4].axvline(pre[-1]["step"], color="k", ls=":", label="GRPO starts")
        ax[4].set(title="expert load balance (busiest expert / mean)", xlabel="training step",
                  ylabel="max load / mean load")
        ax[4].legend()
    fig.subplots_adjust(left=0.045, right=0.955, bottom=0.07, top=0.95, wspace=0.32, hspace=0.3)
    fig.savefig(os.path.join(cfg.out_dir, "nanor1.png"), dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# What the model wrote: out_dir/samples.html (one self-contained page) and --stage sample's lines.
# Model output is untrusted text: every piece of it is escaped, none of it becomes markup.

SHOWN_PER_LEVEL = 6   # held-out problems per level on the page
GROUP_SHOWN = 8       # completions of a GRPO group on the page


def group_samples(problems: list, texts: list, rewards, acc, advantages, G: int) -> list:
    """The first group of a GRPO step's rollouts (one prompt's completions, at most GROUP_SHOWN),
    with their rewards and advantages: for the step's metrics record and samples.html."""
    return [{"problem": problems[i].text, "answer": problems[i].answer, "completion": texts[i],
             "reward": rewards[i].item(), "advantage": advantages[i].item(),
             "right": acc[i].item() == 1.0} for i in range(min(G, GROUP_SHOWN, len(texts)))]


_TAG = re.compile(r"(</?think>|</?answer>)")


def completion_html(text: str) -> str:
    """A completion as HTML: the tags dimmed, the thinking and the answer each in a style of its
    own (text outside both: a third), every piece escaped."""
    part, out = "other", []
    for piece in _TAG.split(text):
        if _TAG.fullmatch(piece):
            out.append(f'<span class="tag">{html.escape(piece)}</span>')
            part = {"<think>": "think", "<answer>": "answer"}.get(piece, "other")
        elif piece:
            out.append(f'<span class="{part}">{html.escape(piece)}</span>')
    return f'<code class="completion">{"".join(out)}</code>'


def _mark(right: bool) -> str:
    return '<span class="right">&#10003; right</span>' if right else \
        '<span class="wrong">&#10007; wrong</span>'


def _answer_cell(rec) -> str:
    if rec is None:
        return '<td class="model">-</td>'
    form = "" if rec.get("well_formed", True) else ' <span class="note">not well formed</span>'
    text = completion_html(rec["completion"])
    return f'<td class="model">{_mark(rec["right"])}{form}<br>{text}</td>'


def levels_tables(shown: dict, titles: dict) -> str:
    """Per level a table: problem, truth, then each model's greedy completion (shown: {model:
    records}; titles: {model: column title}), for the first SHOWN_PER_LEVEL problems."""
    models = [m for m in titles if shown.get(m)]
    if not models:
        return ""
    by_model = {m: {(r["level"], r["problem"]): r for r in shown[m]} for m in models}
    parts = []
    for level in ALL_LEVELS:
        problems = [r for r in shown[models[0]] if r["level"] == level][:SHOWN_PER_LEVEL]
        if not problems:
            continue
        head = "".join(f"<th>{html.escape(titles[m])}</th>" for m in models)
        rows = "".join(
            f'<tr><td class="problem">{html.escape(r["problem"])}=</td>'
            f'<td class="num">{html.escape(str(r["answer"]))}</td>'
            + "".join(_answer_cell(by_model[m].get((level, r["problem"]))) for m in models)
            + "</tr>" for r in problems)
        parts.append(f"<h3>{html.escape(level)}</h3><table><tr><th>problem</th><th>truth</th>"
                     f"{head}</tr>{rows}</table>")
    return "<h2>Held-out problems, greedy</h2>" + "".join(parts)


def grpo_sections(records: list) -> str:
    """For every GRPO step with samples in its metrics record: the step's held-out accuracy and
    training reward, then one group of its sampled completions with rewards and advantages."""
    parts = []
    for r in records:
        samples = r.get("samples") or []
        if not samples:
            continue
        held = r.get("heldout", {}).get("overall", {})
        stats = (f'reward {r.get("reward", 0):.2f}, accuracy {r.get("acc", 0):.2f}, '
                 f'think rate {r.get("think", 0):.2f} in this step\'s samples')
        if held:
            stats += (f' | held-out (greedy) accuracy {held.get("accuracy", 0):.2f}, think rate '
                      f'{held.get("think_rate", 0):.2f}')
        rows = "".join(
            f'<tr><td class="num">{i}</td><td>{_mark(x["right"])}</td>'
            f'<td class="num">{x["reward"]:.2f}</td><td class="num">{x["advantage"]:+.2f}</td>'
            f'<td>{completion_html(x["completion"])}</td></tr>' for i, x in enumerate(samples, 1))
        first = samples[0]
        parts.append(
            f'<h3>GRPO step {int(r["step"])}</h3><p class="stats">{html.escape(stats)}</p>'
            f'<p>one group: {len(samples)} completions sampled for '
            f'<span class="problem">{html.escape(first["problem"])}=</span> (truth '
            f'{html.escape(str(first["answer"]))})</p><table><tr><th>#</th><th>right?</th>'
            f"<th>reward</th><th>advantage</th><th>completion</th></tr>{rows}</table>")
    if not parts:
        return ""
    return ("<h2>GRPO: sampled completions at each held-out evaluation</h2><p>Advantage: the "
            "reward less the group's mean, over the group's std (GRPO); a group whose rewards are "
            "all equal teaches nothing.</p>" + "".join(parts))


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.problem, code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.95em; }
.problem { font-weight: bold; white-space: nowrap; }
code.completion { display: block; white-space: pre-wrap; overflow-wrap: anywhere; }
td.model { width: 40%; }
.tag { color: #999; }
.think { background: #eef3fb; color: #345; }
.answer { background: #fff3c4; font-weight: bold; }
.other { background: #fde2e2; }
.right { color: #176d2c; font-weight: bold; }
.wrong { color: #b3261e; font-weight: bold; }
.note, .stats, .legend { color: #666; }
"""


def samples_page(title: str, subtitle: str, shown: dict, titles: dict, records: list) -> str:
    """The whole page as text: no script, no external file (fonts, styles, images): it opens
    from the file system anywhere."""
    legend = ('<p class="legend">In each completion: <span class="think">the thinking, inside '
              '&lt;think&gt;</span>, <span class="answer">the answer, inside &lt;answer&gt;</span>,'
              ' <span class="other">text outside both</span>, the tags in grey.</p>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>{legend}"
            f"{levels_tables(shown, titles)}{grpo_sections(records)}</body></html>\n")


def write_samples_page(cfg, shown: dict):
    """out_dir/samples.html, from shown (evaluate's records of the base and the final model) and
    the GRPO records in out_dir/metrics.jsonl (so a resumed run's page has every step)."""
    records = [r for r in read_metrics(cfg.out_dir) if r["stage"] == "grpo"]
    first = "the model loaded" if cfg.stage == "eval" else "base (before GRPO)"
    titles = {"base": first, "final": "final (after GRPO)"}
    page = samples_page(f"nanor1: what the model writes ({cfg.out_dir})",
                        f"seed {cfg.seed}, stage {cfg.stage}; held-out problems answered greedily, "
                        f"the first {SHOWN_PER_LEVEL} of each level", shown, titles, records)
    with atomic_write(os.path.join(cfg.out_dir, "samples.html"), "wb") as f:
        f.write(page.encode("utf-8"))   # model text may be any Unicode, whatever the locale


def _printable(text: str) -> str:
    """Model text for a terminal: a control character (an escape sequence, a newline) shown as
    its escape, so that what the model wrote cannot act on the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def problem_line(p, trained=LEVELS) -> str:
    """--stage sample: the problem, its answer, and whether the model was trained on its kind
    (trained: the levels it was trained on)."""
    if p.level == OUTSIDE or p.level not in trained:
        where = (f"outside the training levels ({', '.join(trained)}): the model was never "
                 f"trained on a problem like it")
    else:
        where = f"level {p.level}, " + ("held out (never trained on)" if is_heldout(p.text) else
                                        "a training problem (it may have seen it)")
    return f"{p.prompt} | truth {p.answer} | {where}"


def answer_line(i: int, text: str, answer, right: bool, reward: float) -> str:
    """--stage sample: completion i (0: the greedy one), its parsed answer, right or wrong, its
    reward."""
    label = "greedy" if i == 0 else f"sample {i}"
    return (f"  {label:<9} {'right' if right else 'wrong'}  reward {reward:.2f}  answer "
            f"{'-' if answer is None else answer:<6} {_printable(text)}")


# -----------------------------------------------------------------------------
# The aha-moment experiment (bash aha.sh experiment): the reflective and the plain arm, seed by
# seed, from their out dirs -> out-aha/aha.md (tables) and out-aha/aha.png (curves).

ARMS = ("reflect", "plain")
AHA_ROWS = [("reflect_rate", "reflect rate"), ("catch_rate", "catch rate"),
            ("false_alarm_rate", "false-alarm rate"), ("fix_rate", "fix rate (retry success)"),
            ("verdict_acc", "verdict accuracy"), ("accuracy", "accuracy"),
            ("mean_length", "response length")]


def _cell(values: list, spec: str = ".2f") -> str:
    """Mean (min-max) of the values that exist, "-" if none does."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return format(sum(v) / len(v), spec) + (f" ({min(v):{spec}}-{max(v):{spec}})" if len(v) > 1
                                            else "")


def compare_arms(root: str):
    """root/reflect-<seed>/ and root/plain-<seed>/ (bash aha.sh experiment) -> root/aha.md, a
    table of the reflection rates before and after GRPO per arm, and root/aha.png, their curves."""
    import glob
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {arm: sorted(os.path.dirname(f) for f in
                        glob.glob(os.path.join(root, f"{arm}-*", "summary.json"))) for arm in ARMS}
    summaries = {arm: [json.load(open(os.path.join(d, "summary.json"))) for d in runs[arm]]
                 for arm in ARMS}
    if not all(summaries.values()):
        raise SystemExit(f"error: {root} needs reflect-<seed>/ and plain-<seed>/ runs with a "
                         f"summary.json (bash aha.sh experiment)")
    for arm in ARMS:
        for d, s in zip(runs[arm], summaries[arm]):
            if "final" not in s or "final" not in s.get("reflection", {}):
                raise SystemExit(f"error: {d}: no GRPO result in its summary.json (a run of "
                                 f"--stage all, as bash aha.sh experiment makes, is needed)")
    edge = next((k for k in summaries[ARMS[0]][0]["base"] if k not in LEVELS and k != "overall"),
                None)
    if edge is None:
        raise SystemExit(f"error: {root}: its runs have no edge level (--edge_weight 0)")
    decoding = summaries[ARMS[0]][0]["reflection"].get("decoding", "sampled, forced to think")
    seeds = ", ".join(f"{a}: {len(summaries[a])} seed{'s' * (len(summaries[a]) > 1)}"
                      for a in ARMS)
    lines = [f"# The aha-moment experiment ({seeds})",
             "", f"Mean over seeds (min-max). Held-out problems {decoding}, before (base) and "
             "after GRPO (final); data/reflect.py's rates.", ""]
    for level in (edge, "overall"):
        lines += [f"## {level}", "", "| | " + " | ".join(f"{a} base | {a} final" for a in ARMS)
                  + " |", "|---" * (1 + 2 * len(ARMS)) + "|"]
        for key, name in AHA_ROWS:
            cells = [_cell([s["reflection"][m][level].get(key) for s in summaries[a]],
                           ".1f" if key == "mean_length" else ".2f")
                     for a in ARMS for m in ("base", "final")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    # during GRPO: the samples it trains on, its first ten steps against its last ten
    records = {a: [[r for r in read_metrics(d) if r["stage"] == "grpo"] for d in runs[a]]
               for a in ARMS}
    lines += [f"## During GRPO: its sampled completions, steps 1-10 -> the last 10 (mean of the "
              f"steps' rates, then over seeds)", "",
              "| | " + " | ".join(f"{a} first | {a} last" for a in ARMS) + " |",
              "|---" * (1 + 2 * len(ARMS)) + "|"]
    for level, key, name in [(edge, "reflect_rate", f"{edge} reflect rate"),
                             (edge, "catch_rate", f"{edge} catch rate"),
                             (edge, "false_alarm_rate", f"{edge} false-alarm rate"),
                             ("overall", "reflect_rate", "overall reflect rate"),
                             (None, "acc", "accuracy (all levels)"),
                             (None, "length", "response length (all levels)")]:
        def mean(rs):
            v = [r[key] if level is None else r.get("reflection", {}).get(level, {}).get(key)
                 for r in rs]
            v = [x for x in v if x is not None]
            return sum(v) / len(v) if v else None
        cells = [_cell([mean(rs[:10] if part == 0 else rs[-10:]) for rs in records[a]],
                       ".1f" if key == "length" else ".2f") for a in ARMS for part in (0, 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["## Greedy held-out (R1-Zero's signature; overall = the four R1-Zero levels)", "",
              f"| arm | seed | overall | multi | {edge} | {edge} forced to think (base) | think | "
              "length | wall |", "|---" * 9 + "|"]
    for a in ARMS:
        for s in summaries[a]:
            b, f = s["base"], s["final"]
            pair = lambda lvl, key: f"{b[lvl][key]:.2f} -> {f[lvl][key]:.2f}"
            lines.append(f"| {a} | {s['seed']} | {pair('overall', 'accuracy')} | "
                         f"{pair('multi', 'accuracy')} | {pair(edge, 'accuracy')} | "
                         f"{s['base_forced_think'][edge]['accuracy']:.2f} | "
                         f"{pair('overall', 'think_rate')} | {b['overall']['mean_length']:.1f} -> "
                         f"{f['overall']['mean_length']:.1f} | "
                         f"{fmt_time(s['wall_seconds']['total'])} |")
    with atomic_write(os.path.join(root, "aha.md")) as f:
        f.write("\n".join(lines) + "\n")
    # curves: each seed's sampled GRPO steps, the edge level's rates, a line per seed
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.5))
    for ci, a in enumerate(ARMS):
        for d, rl in zip(runs[a], records[a]):
            steps = [r["step"] for r in rl]
            for i, key in enumerate(("reflect_rate", "catch_rate", "false_alarm_rate")):
                ys = [r.get("reflection", {}).get(edge, {}).get(key) for r in rl]
                ax[i].plot(steps, smooth_rates(ys), color=f"C{ci}", alpha=0.8,
                           label=a if d == runs[a][0] else None)
            ax[3].plot(steps, smooth_rates([r["length"] for r in rl]), color=f"C{ci}", alpha=0.8,
                       label=a if d == runs[a][0] else None)
    for i, title in enumerate(["reflect rate", "catch rate", "false-alarm rate"]):
        ax[i].set(title=f"{title}, sampled worked solutions ({edge})", xlabel="GRPO step",
                  ylim=(0, 1.0 if i == 0 else 0.5))
    ax[3].set(title="mean response length (samples, all levels)", xlabel="GRPO step",
              ylabel="tokens")
    for x in ax:
        x.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(root, "aha.png"), dpi=100)
    plt.close(fig)
    print("\n".join(lines) + f"\n\nwrote {root}/aha.md, {root}/aha.png")


if __name__ == "__main__":   # python report.py compare out-aha
    import sys
    if sys.argv[1:2] != ["compare"] or len(sys.argv) != 3:
        raise SystemExit("usage: python report.py compare OUT_ROOT   (see aha.sh)")
    compare_arms(sys.argv[2])
