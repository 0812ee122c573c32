"""--stage sample: ask a checkpoint a problem of your own. For each --prompt (or line of standard
input) it prints the truth and whether the problem is of a trained level, then the greedy
completion (checked against a plain argmax loop with no cache) and --num_samples sampled ones, each
judged by the rewards computed here from the printed text. Text that is not a problem is one line
on stderr and exit code 2; model text cannot act on the terminal."""
import io
import os
import subprocess
import sys

import pytest
import torch

import data
import nanor1
import plumbing
from marks import needs
from moe import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=nanor1.enc.n_vocab, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2,
            n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=4, n_activated_experts=2, max_seq_len=160)


GENERATE = ("rmsnorm_rope", "gate", "mla_absorb")   # a forward pass, then decoding with the cache


@pytest.fixture
def ckpt(tmp_path):
    """A random tiny model's checkpoint (weights large enough that it writes varied text)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    path = str(tmp_path / "model.pt")
    plumbing.save_checkpoint(path, model, nanor1.Config())
    return path, model


def ask(args, capsys):
    """nanor1.main(["--stage", "sample", ...]) -> (exit code, stdout lines, stderr)."""
    code = 0
    try:
        nanor1.main(["--stage", "sample", "--threads", "1", "--device", "cpu", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):      # SystemExit("error: ..."): Python prints it, exit code 1
        code, err = 1, err + code + "\n"
    return code, out.splitlines(), err


def fixed_generate(texts):
    """Stands in for nanor1.generate: completion i of the run is texts[i]; records the calls."""
    calls = []

    def generate(model, prompts, max_new_tokens, temperature, top_k, greedy, *rest):
        calls.append((len(prompts), greedy))
        ids = nanor1.encode(texts[len(calls) - 1]) + [nanor1.EOT]
        out = torch.tensor([ids])
        return out, torch.ones_like(out, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    return generate, calls


@needs("rmsnorm_rope", "rewards")   # generation stands in, the rewards are nanor1's
def test_each_completion_is_judged_with_its_answer_and_reward(ckpt, capsys, monkeypatch):
    texts = ["<think>47+85:7+5=12,4+8+1=13>132</think><answer>132</answer>",   # right, formatted
             "<answer>132</answer>",                                           # right, no format
             "<think>x</think><answer>131</answer>",                           # wrong, formatted
             "132",                                                            # no <answer> at all
             "<think>\x1b[2J\x1b[31m</think>\n<answer>132</answer>"]           # terminal escapes
    generate, calls = fixed_generate(texts)
    monkeypatch.setattr(nanor1, "generate", generate)
    code, out, err = ask(["--init_from", ckpt[0], "--prompt", "47 + 85", "--num_samples", "4"],
                         capsys)
    assert code == 0, err
    assert calls == [(1, True)] + [(1, False)] * 4, "first the greedy one, then 4 sampled"
    lines = [line for line in out if line.startswith("  ")]
    assert out[1].startswith("47+85= | truth 132 | level add2"), out
    assert [line.split()[:1 + line.startswith("  sample")] for line in lines] == \
        [["greedy"]] + [["sample", str(i)] for i in range(1, 5)]
    expected = [("right", "1.20", "132"), ("right", "1.00", "132"), ("wrong", "0.20", "131"),
                ("wrong", "0.00", "-"), ("right", "1.20", "132")]      # acc 1.0, format 0.2
    for line, (verdict, reward, answer) in zip(lines, expected):
        words = line.split()
        at = words.index("reward")
        assert (words[at - 1], words[at + 1], words[at + 3]) == (verdict, reward, answer), line
    assert len(lines) == 5 and "\x1b" not in "\n".join(out) and "\\x1b[2J" in lines[4]


@needs(*GENERATE, "rewards")
def test_the_greedy_completion_is_the_argmax_of_the_checkpoint(ckpt, capsys):
    path, model = ckpt
    code, out, err = ask(["--init_from", path, "--prompt", "(47+85)*3-29", "--num_samples", "0",
                          "--max_new_tokens", "24"], capsys)
    assert code == 0, err
    # the same checkpoint decoded by a plain loop: the whole sequence again at each step, no cache
    seq = nanor1.prompt_tokens("(47+85)*3-29=")
    new = []
    with torch.no_grad():
        for _ in range(24):
            nxt = model(torch.tensor([seq + new]))[0][0, -1].argmax().item()
            if nxt == nanor1.EOT:
                break
            new.append(nxt)
    expected = nanor1.enc.decode(new)
    greedy = [line for line in out if line.startswith("  greedy")]
    assert len(greedy) == 1 and "sample" not in "\n".join(out[2:])
    printable = "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                        for c in expected)
    assert greedy[0].endswith(" " + printable), (greedy[0], printable)


@needs(*GENERATE, "rewards")
def test_sampled_completions_follow_the_seed(ckpt, capsys):
    args = ["--init_from", ckpt[0], "--prompt", "347*6", "--num_samples", "3",
            "--max_new_tokens", "16"]
    first = ask(args, capsys)[1]
    assert ask(args, capsys)[1] == first
    other = ask(args + ["--seed", "5"], capsys)[1]
    samples = lambda out: [line for line in out if line.startswith("  sample")]
    assert len(samples(first)) == 3 and samples(other) != samples(first)


@needs(*GENERATE, "rewards")
def test_problems_come_one_a_line_from_standard_input(ckpt, capsys, monkeypatch):
    heldout = data.test_set(1)["multi"][0].text
    stdin = f"47+85\n\n  {heldout} =\n1234+5678\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code, out, err = ask(["--init_from", ckpt[0], "--num_samples", "1", "--max_new_tokens", "8"],
                         capsys)
    assert code == 0, err
    heads = [line for line in out if " | truth " in line]
    assert [h.split(" | ")[0] for h in heads] == ["47+85=", f"{heldout}=", "1234+5678="]
    assert "level add2, a training problem" in heads[0]
    assert "level multi, held out" in heads[1]
    assert "truth 6912 | outside the training levels" in heads[2]   # answered all the same
    assert sum(line.startswith("  ") for line in out) == 6


@needs(*GENERATE, "rewards")
def test_the_edge_level_is_a_training_level_only_for_a_model_trained_on_it(ckpt, capsys):
    """47*85 has the shape of the edge level (mul2); the default run never trains on it."""
    args = ["--prompt", "47*85", "--num_samples", "0", "--max_new_tokens", "4"]
    head = next(line for line in ask(["--init_from", ckpt[0], *args], capsys)[1] if " | truth " in line)
    assert "truth 3995 | outside the training levels (add2, add3, mul, multi)" in head
    edge = ckpt[0].replace("model.pt", "edge.pt")
    plumbing.save_checkpoint(edge, ckpt[1], nanor1.Config(edge_weight=0.1))
    head = next(line for line in ask(["--init_from", edge, *args], capsys)[1] if " | truth " in line)
    assert "truth 3995 | level mul2, held out" in head            # 47*85 is in the test set


@pytest.mark.parametrize("args, stdin, says", [
    (["--prompt", "abc"], "", "--prompt 'abc': not a problem"),
    (["--prompt", ""], "", "--prompt '': not a problem"),
    (["--prompt", "47+85", "--prompt", "47+"], "", "--prompt '47+': not a problem"),
    (["--prompt", "1+" * 64 + "1"], "", "tokens and --max_new_tokens=32 do not fit in the model's "
                                        "context (max_seq_len 160)"),
    ([], "47+85\n\xff\xfe\n", "standard input line 2"),
    ([], "\n \n", "no problem to ask"),
])
@needs("rmsnorm_rope")   # the model is built (loaded) before the problems are read
def test_text_that_is_not_a_problem_is_one_line_and_exit_2(ckpt, capsys, monkeypatch, args,
                                                           stdin, says):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("latin-1"))))
    code, out, err = ask(["--init_from", ckpt[0], "--max_new_tokens", "32", *args], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert says in err, err
    assert not [line for line in out if line.startswith("  ")], "nothing is generated"


@needs("rmsnorm_rope")
def test_prompt_is_for_the_sample_stage_and_bad_input_never_shows_a_traceback(ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, says in ((["--stage", "grpo", "--prompt", "1+1"], "is for --stage sample"),
                       (["--stage", "sample", "--init_from", ckpt[0], "--prompt", "2^3"],
                        "found '^'"),
                       (["--stage", "sample", "--init_from", str(tmp_path / "none.pt"),
                         "--prompt", "1+1"], "not found")):
        r = subprocess.run([sys.executable, "nanor1.py", "--threads", "1", *args], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
