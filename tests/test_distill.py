"""The rest of the R1 recipe: SFT learns the completions and never the prompts; rejection sampling
keeps exactly the right, well-formed, distinct samples of training problems; a smaller student is
about a quarter of the teacher; GRPO can stop at a wall-time budget; tiny `--stage distill` and
`--stage r1` runs finish and merge their results into summary.json."""
import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

import data
import moe
import nanor1
import plumbing
from marks import ALL, GRPO, MODEL, needs
from nanor1 import EOT, enc, encode

TINY = dict(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_activated_experts=2)
TINY_FLAGS = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
TINY_RUN = ["--threads", "1", "--device", "cpu", *TINY_FLAGS, "--batch_size", "4", "--warmup_steps", "2",
            "--log_every", "5", "--eval_every", "0", "--prompts_per_step", "2", "--group_size", "2",
            "--max_new_tokens", "16", "--grpo_eval_every", "0", "--grpo_eval_n", "1", "--n_test", "2",
            "--eval_batch", "64", "--sft_batch", "4", "--rs_samples", "2"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return moe.Transformer(moe.ModelConfig(**TINY, vocab_size=enc.n_vocab))


def answer_of(problem: str) -> int:
    """The value of a problem's text, computed here by its own small parser (never eval)."""
    m = re.fullmatch(r"\((\d+)([+-])(\d+)\)\*(\d+)([+-])(\d+)", problem)
    if m:
        a, op1, b, c, op2, d = m.groups()
        v = (int(a) + int(b) if op1 == "+" else int(a) - int(b)) * int(c)
        return v + int(d) if op2 == "+" else v - int(d)
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", problem).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def right_and_well_formed(text: str, answer: int) -> bool:
    """The test's own filter, for the canonical texts the fakes below write."""
    m = re.fullmatch(r"<think>([^<>]+)</think><answer>(\d+)</answer>", text)
    return m is not None and int(m.group(2)) == answer


def problem_of(prompt: list) -> str:
    """[EOT] + "47+85=" -> "47+85"."""
    assert prompt[0] == EOT and enc.decode(prompt[1:]).endswith("=")
    return enc.decode(prompt[1:])[:-1]


def as_generate_output(texts, max_new_tokens):
    """What generate() returns for these completions: tokens (B, L) padded with EOT, the mask up to
    and including the first EOT, and no truncation."""
    rows = [(encode(t) + [EOT])[:max_new_tokens] for t in texts]
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), EOT, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return out, mask, torch.zeros(len(rows), dtype=torch.bool)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# -----------------------------------------------------------------------------
# SFT: completion tokens are the only targets

def random_examples(n, seed=0):
    rng = random.Random(seed)
    return [([EOT] + [rng.randrange(256) for _ in range(rng.randint(0, 6))],
             [rng.randrange(nanor1.enc.n_vocab) for _ in range(rng.randint(1, 7))] + [EOT]) for _ in range(n)]


def test_sft_batch_targets_are_the_completion_tokens_only():
    examples = random_examples(12)
    x, y = plumbing.sft_rows(examples, nanor1.EOT)
    T = max(len(p) + len(c) for p, c in examples) - 1
    assert x.shape == y.shape == (len(examples), T)
    for i, (p, c) in enumerate(examples):
        seq = p + c
        for t in range(T):
            # input: the sequence, then end-of-text padding; target: the next token iff it is a completion token
            assert x[i, t].item() == (seq[t] if t < len(seq) - 1 else EOT), (i, t)
            is_completion_target = len(p) <= t + 1 < len(seq)
            assert y[i, t].item() == (seq[t + 1] if is_completion_target else -1), (i, t)
        assert (y[i] != -1).sum().item() == len(c)        # every completion token, its end-of-text included


@pytest.mark.rmsnorm_rope
@pytest.mark.gate
def test_sft_loss_is_the_mean_nll_of_completion_tokens_and_ignores_the_prompts():
    model = tiny_model().eval()
    examples = random_examples(6, seed=1)
    x, y = plumbing.sft_rows(examples, nanor1.EOT)
    # the loss, padded and batched, equals the NLL of the completion tokens of each example run alone
    loss, _ = nanor1.sft_loss(model, x, y, torch.autocast("cpu", enabled=False))
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, c in examples:
            seq = torch.tensor([p + c])
            logp = model(seq[:, :-1])[0].log_softmax(-1)[0]          # (len - 1, V)
            for j, tok in enumerate(c):
                nll -= logp[len(p) - 1 + j, tok].item()
            n += len(c)
    assert loss.item() == pytest.approx(nll / n, rel=1e-5)
    # its gradient reaches the predictions of completion tokens only: whatever the target of a prompt
    # position (or of the padding), it changes nothing
    logits = {}

    def keep_logits(module, inputs, out):
        out.retain_grad()
        logits["z"] = out

    hook = model.head.register_forward_hook(keep_logits)
    loss, _ = nanor1.sft_loss(model, x, y, torch.autocast("cpu", enabled=False))
    hook.remove()
    loss.backward()
    g = logits["z"].grad.abs().sum(-1)                           # (B, T)
    for i, (p, c) in enumerate(examples):
        completion = torch.zeros(x.size(1), dtype=torch.bool)
        completion[len(p) - 1:len(p) - 1 + len(c)] = True
        assert (g[i, ~completion] == 0).all(), i
        assert (g[i, completion] > 0).all(), i
    # a changed completion token changes the loss
    p, c = examples[0]
    changed = [(p, [(c[0] + 1) % 256] + c[1:])] + examples[1:]
    assert nanor1.sft_loss(model, *plumbing.sft_rows(changed, nanor1.EOT), torch.autocast("cpu", enabled=False))[0].item() != \
        pytest.approx(loss.item(), rel=1e-6)


@needs(*MODEL)
def test_sft_learns_the_completions_and_not_the_prompt(tmp_path):
    """Every example shares one prompt: training on it too would make it easy to predict. sft() must
    leave it as surprising as before (or more) while the completions become near certain."""
    prompt = [EOT] + encode("12+34=")
    examples = [(prompt, encode(f"<think>{d}</think><answer>{d}{d}</answer>") + [EOT]) for d in "0123456789"]
    x, y = plumbing.sft_rows(examples, nanor1.EOT)
    prompt_targets = torch.full_like(y, -1)
    prompt_targets[:, :len(prompt) - 1] = x[:, 1:len(prompt)]

    @torch.no_grad()
    def nll(model, targets):
        model.eval()
        logits = model(x)[0]
        model.train()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1).item()

    model = tiny_model()
    before = nll(model, prompt_targets), nll(model, y)
    cfg = nanor1.Config(out_dir=str(tmp_path), device="cpu", sft_batch=10, warmup_steps=2, log_every=100,
                        model=model.cfg)
    nanor1.sft(cfg, model, examples, steps=60, lr=1e-2, device=torch.device("cpu"))
    after = nll(model, prompt_targets), nll(model, y)
    assert after[1] < 0.5 * before[1] and after[1] < 1.0, (before, after)      # the completions: learned
    assert after[0] > before[0] - 0.5 and after[0] > 3.0, (before, after)     # the prompt: not learned


# -----------------------------------------------------------------------------
# Rejection sampling

@pytest.mark.rewards
def test_rejection_sampling_keeps_exactly_the_right_well_formed_distinct_samples(tmp_path, monkeypatch):
    rng = random.Random("rejection-test")
    problems = [next(data.training_problems(random.Random(i))) for i in range(5)]
    problems.append(problems[0])                                   # a problem drawn twice: still distinct once
    K = 4
    calls, sampled = [], []

    def candidates(answer):
        return [f"<think>a</think><answer>{answer}</answer>",      # right, well formed
                f"<think>b</think><answer>{answer}</answer>",      # right, well formed, other thoughts
                f"<answer>{answer}</answer>",                      # right, no thinking: not well formed
                f"<think>a</think><answer>{answer + 1}</answer>",  # well formed, wrong
                f"<think>a</think>",                               # no answer
                f"<think>a</think><answer>{answer}</answer>x"]     # text after the answer: not well formed

    def fake_generate(model, prompts, max_new_tokens, *args, **kw):
        calls.append(len(prompts))
        texts = [rng.choice(candidates(answer_of(problem_of(p)))) for p in prompts]
        sampled.extend(zip((problem_of(p) for p in prompts), texts))
        return as_generate_output(texts, max_new_tokens)

    monkeypatch.setattr(nanor1, "generate", fake_generate)
    cfg = nanor1.Config(out_dir=str(tmp_path), device="cpu", eval_batch=8, max_new_tokens=32)
    path = str(tmp_path / "traces.jsonl")
    kept = nanor1.rejection_sample(cfg, torch.nn.Module(), problems, K, torch.device("cpu"), seed=0, path=path)
    # K samples of every problem, in batches of at most eval_batch sequences
    assert sorted(p for p, _ in sampled) == sorted(p.text for p in problems for _ in range(K))
    assert max(calls) <= 8 and sum(calls) == K * len(problems)
    expected = []
    for problem, text in sampled:
        if right_and_well_formed(text, answer_of(problem)) and (problem, text) not in expected:
            expected.append((problem, text))
    assert [(r["problem"], r["completion"]) for r in kept] == expected
    assert len(expected) >= 3                                      # the draw kept something, and not everything
    for r in kept:
        p = next(p for p in problems if p.text == r["problem"])
        assert (r["prompt"], r["answer"], r["level"]) == (f"{p.text}=", p.answer, p.level)
    assert read_jsonl(path) == kept


def test_rejection_sampling_refuses_held_out_problems(monkeypatch):
    monkeypatch.setattr(nanor1, "generate", lambda *a, **k: pytest.fail("sampled a held-out problem"))
    held_out = data.test_set(1)["add2"][0]
    train = next(data.training_problems(random.Random(0)))
    with pytest.raises(ValueError, match="held out"):
        nanor1.rejection_sample(nanor1.Config(device="cpu"), torch.nn.Module(), [train, held_out], 2, torch.device("cpu"))


# -----------------------------------------------------------------------------
# The student, GRPO on a time budget

@pytest.mark.rmsnorm_rope
def test_the_default_student_is_about_a_quarter_of_the_teacher():
    teacher_cfg = moe.ModelConfig(vocab_size=enc.n_vocab)
    student_cfg = nanor1.student_config(teacher_cfg, nanor1.Config.student_dim)
    count = lambda c: sum(p.numel() for p in moe.Transformer(c).parameters())
    assert 0.2 < count(student_cfg) / count(teacher_cfg) < 0.3
    assert student_cfg.dim == 64 and student_cfg.n_layers == teacher_cfg.n_layers
    assert (student_cfg.n_heads, student_cfg.n_routed_experts, student_cfg.n_activated_experts) == \
        (teacher_cfg.n_heads, teacher_cfg.n_routed_experts, teacher_cfg.n_activated_experts)
    fewer = nanor1.student_config(teacher_cfg, 64, n_layers=2)
    assert fewer.n_layers == 2 and fewer.n_dense_layers <= 2 and fewer.qk_rope_head_dim % 2 == 0


@needs(*ALL)
def test_grpo_stops_after_the_step_that_reaches_max_seconds(tmp_path):
    model = tiny_model()
    ref = tiny_model()
    cfg = nanor1.Config(out_dir=str(tmp_path), device="cpu", grpo_steps=50, prompts_per_step=2, group_size=2,
                        max_new_tokens=4, grpo_eval_every=0, grpo_eval_n=1, eval_batch=64, model=model.cfg)
    history = []
    nanor1.grpo(cfg, model, ref, torch.device("cpu"), 0, 1, data.test_set(1), history,
                reward_fn=lambda text, p: float("7" in text), max_seconds=1e-9)
    assert [h["step"] for h in history] == [1]
    # the last step keeps a group of its samples; the held-out evaluation of the result is the
    # caller's (main, finish_stage), not repeated inside grpo
    assert history[-1]["samples"] and "heldout" not in history[-1]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1


# -----------------------------------------------------------------------------
# Whole stages, tiny

def save_tiny(path, seed=0):
    model = tiny_model(seed)
    nanor1.save_checkpoint(str(path), model, nanor1.Config(model=model.cfg), stage="grpo", step=1)
    return model


@needs(*ALL)
def test_a_tiny_distill_run_writes_the_experiment_into_the_summary(tmp_path, monkeypatch):
    teacher = save_tiny(tmp_path / "final.pt")
    # the teacher (the only model of width 32) answers every problem right, with a thought; the
    # student (width 16) generates for real
    real_generate = nanor1.generate

    def generate(model, prompts, max_new_tokens, *args, **kw):
        if model.cfg.dim != TINY["dim"]:
            return real_generate(model, prompts, max_new_tokens, *args, **kw)
        texts = [f"<think>{problem_of(p)}</think><answer>{answer_of(problem_of(p))}</answer>" for p in prompts]
        return as_generate_output(texts, 64)

    monkeypatch.setattr(nanor1, "generate", generate)
    (tmp_path / "summary.json").write_text(json.dumps({"seed": 5, "final": {"overall": {}}}))
    nanor1.main(["--stage", "distill", *TINY_RUN, "--out_dir", str(tmp_path), "--max_new_tokens", "32",
                 "--student_dim", "16", "--student_pretrain_steps", "10", "--rs_prompts", "5", "--grpo_steps", "3"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 5 and summary["final"] == {"overall": {}}      # merged, not overwritten
    stages = summary["stages"]
    assert [s["name"] for s in stages] == ["student_pretrain", "teacher_traces", "student_sft", "student_grpo"]
    for s in stages:
        assert s["pipeline"] == "distill" and s["wall_seconds"] >= 0
        assert set(s["heldout"]) == set(data.LEVELS) | {"overall"}
        for v in s["heldout"].values():
            assert set(v) == {"accuracy", "think_rate", "mean_length"} and 0 <= v["accuracy"] <= 1
    d = summary["distill"]
    for key in ("student_rl", "student_distilled", "teacher"):
        assert set(d[key]) == set(data.LEVELS) | {"overall"}
    assert d["teacher"]["overall"]["accuracy"] == 1.0 and d["teacher"]["overall"]["think_rate"] == 1.0
    assert d["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    student, _ = plumbing.load_checkpoint(str(tmp_path / "distill" / "student_distilled" / "model.pt"), "cpu")
    assert student.cfg.dim == 16 and d["student_params"] == sum(p.numel() for p in student.parameters())
    assert d["student_params"] < d["teacher_params"] / 2     # (the tiny models are mostly embedding)
    # (a) ran GRPO for about (b)'s wall time: at least one step, at most --grpo_steps
    assert 1 <= d["student_rl_steps"] <= 3 and stages[3]["steps"] == d["student_rl_steps"]
    # the traces: right, well formed, training problems only, distinct (the fake teacher repeats itself)
    traces = read_jsonl(tmp_path / "distill" / "teacher_traces" / "traces.jsonl")
    assert len(traces) == d["traces"] == len({t["problem"] for t in traces}) == 5
    for t in traces:
        assert right_and_well_formed(t["completion"], answer_of(t["problem"])) and not data.is_heldout(t["problem"])


def half_right_generate(model, prompts, max_new_tokens, *args, **kw):
    """Stands in for nanor1.generate in tiny r1 runs: every model answers half its rows right (even
    rows) and half wrong: GRPO has something to learn from, rejection sampling something to keep
    and something to drop. (Nothing decodes for real, so no mla_absorb mark: the absorbed
    attention serves only decoding.)"""
    texts = []
    for i, p in enumerate(prompts):
        answer = answer_of(problem_of(p)) + i % 2
        texts.append(f"<think>{problem_of(p)}</think><answer>{answer}</answer>")
    return as_generate_output(texts, 64)


@needs(*GRPO)
def test_a_tiny_r1_run_has_its_four_stages_in_the_summary(tmp_path, monkeypatch):
    base = save_tiny(tmp_path / "base.pt")
    monkeypatch.setattr(nanor1, "generate", half_right_generate)
    stale = {"name": "old", "pipeline": "r1", "wall_seconds": 1, "heldout": {}}
    other = {"name": "student_sft", "pipeline": "distill", "wall_seconds": 1, "heldout": {}}
    (tmp_path / "summary.json").write_text(json.dumps({"stages": [stale, other], "distill": {"x": 1}}))
    nanor1.main(["--stage", "r1", *TINY_RUN, "--out_dir", str(tmp_path), "--max_new_tokens", "32",
                 "--cold_start", "8", "--r1_grpo_steps", "2", "--rs_prompts", "4"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distill"] == {"x": 1}
    assert summary["stages"][0] == other                          # another pipeline's stages stay
    r1 = summary["stages"][1:]
    assert [s["name"] for s in r1] == ["cold_start_sft", "reasoning_rl", "rejection_sft", "final_rl"]
    for s in r1:
        assert s["pipeline"] == "r1" and s["wall_seconds"] >= 0
        assert set(s["heldout"]) == set(data.LEVELS) | {"overall"}
        assert s["heldout"]["overall"]["accuracy"] == 0.5        # greedy eval through the fake: even rows right
    # cold start: worked solutions of training problems, exactly as the pretraining corpus writes them
    cold = read_jsonl(tmp_path / "r1" / "cold_start_sft" / "cold_start.jsonl")
    assert len(cold) == 8 == r1[0]["examples"]
    for r in cold:
        assert not data.is_heldout(r["problem"]) and r["prompt"] == f"{r['problem']}="
        assert r["completion"].startswith("<think>") and r["completion"].endswith(f"<answer>{answer_of(r['problem'])}</answer>")
    # rejection sampling kept the right half of 4 problems x 2 samples: one distinct trace per problem
    traces = read_jsonl(tmp_path / "r1" / "rejection_sft" / "traces.jsonl")
    assert len(traces) == r1[2]["examples"] == 4
    assert all(right_and_well_formed(t["completion"], answer_of(t["problem"])) for t in traces)
    # every stage trained: its saved model differs from the base
    for name in ("cold_start_sft", "reasoning_rl", "rejection_sft", "final_rl"):
        model, _ = plumbing.load_checkpoint(str(tmp_path / "r1" / name / "model.pt"), "cpu")
        assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values())), name


@needs(*GRPO)
def test_r1_fine_tunes_the_base_both_times_not_the_rl_model(tmp_path, monkeypatch):
    """--stage r1's two SFT stages (cold start, and SFT on the traces rejection-sampled from the RL
    model) both start from the base checkpoint's weights, as DeepSeek-R1 sec 2.3.3 fine-tunes
    DeepSeek-V3-Base; the RL model they are sampled from differs from the base. Guards against the
    rejection-sampling SFT continuing from the RL model instead of the base."""
    save_tiny(tmp_path / "base.pt")
    monkeypatch.setattr(nanor1, "generate", half_right_generate)
    at_entry, real_fine_tune = {}, nanor1.fine_tune

    def fine_tune(cfg, model, records, device, name):
        at_entry[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_fine_tune(cfg, model, records, device, name)

    monkeypatch.setattr(nanor1, "fine_tune", fine_tune)
    nanor1.main(["--stage", "r1", *TINY_RUN, "--out_dir", str(tmp_path), "--max_new_tokens", "32",
                 "--cold_start", "4", "--r1_grpo_steps", "1", "--rs_prompts", "2"])
    base = torch.load(tmp_path / "base.pt", weights_only=True)["model"]
    rl = torch.load(tmp_path / "r1" / "reasoning_rl" / "model.pt", weights_only=True)["model"]
    assert list(at_entry) == ["cold_start_sft", "rejection_sft"]
    assert any(not torch.equal(rl[k], base[k]) for k in base), "the RL model moved away from the base"
    for name, state in at_entry.items():
        assert set(state) == set(base), name
        changed = [k for k in base if not torch.equal(state[k], base[k])]
        assert not changed, f"{name} did not start from the base: {changed[:3]} differ"
