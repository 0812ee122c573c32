"""The reflection metrics as a run reports them: per level, "overall" over R1-Zero's four levels
only (the edge level on its own), summed across completions as a hand count says, logged at every
GRPO step, in summary.json under "reflection" and in the final table."""
import json
import os
import subprocess
import sys

import torch

import data
import report
from data.reflect import RATE_FIELDS
from marks import ALL, needs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RETRY_FIXED = "<think>47+85:7+5=11 wait 7+5=12,4+8+1=13>132</think><answer>132</answer>"
PLAIN_WRONG = "<think>47+85:7+5=12,4+8+1=14>142</think><answer>142</answer>"
CHECK_OK = ("<think>47+85:7+5=12,4+8+1=13>132 check 132-85:12-5=7,13-8-1=4,1-0-1=0>47 ok</think>"
            "<answer>132</answer>")
FALSE_NO = ("<think>47+85:7+5=12,4+8+1=13>132 check 132-85:12-5=7,13-8-1=4,1-0-1=0>47 no wait "
            "47+85:7+5=12,4+8+1=13>132</think><answer>132</answer>")
DIRECT = "<answer>132</answer>"


def problem(level):
    return data.Problem(level, "47+85", 132, "")


def test_sampled_reflection_sums_counts_per_level_and_overall_means_the_four_levels():
    # add2: a fixed retry, a plain wrong one, an answer; mul2 (edge): a right check, a false "no"
    items = [("add2", RETRY_FIXED), ("add2", PLAIN_WRONG), ("add2", DIRECT),
             ("mul2", CHECK_OK), ("mul2", FALSE_NO)]
    res = report.sampled_reflection([problem(lvl) for lvl, _ in items], [t for _, t in items],
                                    ["add2", "mul2"], torch.device("cpu"))
    assert list(res) == ["add2", "overall", "mul2"]
    # hand count, add2: 2 thinking, 1 reflective; wrong claims: 7+5=11, 4+8+1=14, 142 (3), the
    # first flagged and fixed; right claims: 7+5=12, 4+8+1=13, 132, 7+5=12 (4), none flagged
    assert res["add2"] == {"reflect_rate": 1 / 2, "catch_rate": 1 / 3, "false_alarm_rate": 0.0,
                           "fix_rate": 1.0, "verdict_acc": None, "keyword_rate": 1 / 3}
    assert res["overall"] == res["add2"]                   # the edge level is not in "overall"
    # mul2: both reflective; right claims: CHECK_OK 3+4 = 7, FALSE_NO 3 + 4 (check) + 3 (redo) =
    # 10: 17, one flagged (132 under "no"), its redo right; no wrong claim; verdicts 1 of 2 right
    assert res["mul2"] == {"reflect_rate": 1.0, "catch_rate": None, "false_alarm_rate": 1 / 17,
                           "fix_rate": 1.0, "verdict_acc": 0.5, "keyword_rate": 1.0}


def test_level_rates_put_the_edge_level_after_overall_and_keep_overall_to_the_four():
    sums = torch.zeros(5, 5 + len(report.COUNT_FIELDS))
    sums[:, 0] = torch.tensor([10, 10, 10, 10, 10.])          # n
    sums[:, 1] = torch.tensor([10, 8, 6, 4, 1.])              # correct
    res = report.level_rates(sums, list(data.ALL_LEVELS))
    assert list(res) == ["add2", "add3", "mul", "multi", "overall", "mul2"]
    assert res["overall"]["accuracy"] == 28 / 40 and res["mul2"]["accuracy"] == 0.1
    assert set(res["mul2"]["reflection"]) == set(RATE_FIELDS)
    only_edge = report.level_rates(sums[4:], ["mul2"])         # no R1-Zero level: overall is all
    assert only_edge["overall"]["accuracy"] == 0.1


@needs(*ALL)
def test_a_run_logs_reflection_at_every_grpo_step_and_summarises_it(tmp_path):
    tiny = ["--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "32", "--n_layers", "2",
            "--n_heads", "2", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
            "--qk_rope_head_dim", "8", "--v_head_dim", "8", "--n_routed_experts", "4",
            "--n_activated_experts", "2"]
    cmd = [sys.executable, "nanor1.py", "--out_dir", str(tmp_path), "--threads", "1", *tiny,
           "--edge_weight", "1", "--verify_frac", "0.5", "--retry_frac", "0.5", "--block_size",
           "256", "--batch_size", "4", "--pretrain_steps", "4", "--eval_every", "0",
           "--grpo_steps", "3", "--prompts_per_step", "2", "--group_size", "2",
           "--max_new_tokens", "16", "--n_test", "2", "--grpo_eval_n", "1", "--grpo_eval_every", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "edge level mul2 x1, reflective: verify 0.5 retry 0.5" in r.stdout
    assert "reflection within worked solutions (sampled T=1.0, forced to think" in r.stdout
    summary = json.load(open(tmp_path / "summary.json"))
    levels = ["add2", "add3", "mul", "multi", "overall", "mul2"]
    for model in ("base", "final"):
        assert list(summary["reflection"][model]) == levels
        for lvl in levels:
            assert set(RATE_FIELDS) | {"accuracy", "mean_length"} == \
                set(summary["reflection"][model][lvl])
    assert "mul2" in summary["final"] and summary["reflection"]["decoding"].startswith("sampled")
    grpo = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")
            if '"grpo"' in line]
    assert [g["step"] for g in grpo] == [1, 2, 3]
    assert all(list(g["reflection"]) == levels for g in grpo)
    assert all("reflection" in g["heldout"]["mul2"] for g in grpo if "heldout" in g)


def fake_run(root, name, seed, reflect_before, reflect_after, rates_per_step):
    """A run directory as bash aha.sh experiment leaves it: summary.json and metrics.jsonl."""
    d = root / name
    d.mkdir()
    def level(r, acc):
        return dict({f: None for f in RATE_FIELDS}, reflect_rate=r, accuracy=acc, mean_length=50.0)
    greedy = {k: {"accuracy": 0.5, "think_rate": 0.0, "mean_length": 5.0}
              for k in ["add2", "add3", "mul", "multi", "overall", "mul2"]}
    summary = {"seed": seed, "wall_seconds": {"total": 61.0}, "base": greedy, "final": greedy,
               "base_forced_think": greedy,
               "reflection": {"base": {"overall": level(reflect_before, 0.9),
                                       "mul2": level(reflect_before, 0.6)},
                              "final": {"overall": level(reflect_after, 0.9),
                                        "mul2": level(reflect_after, 0.7)}}}
    (d / "summary.json").write_text(json.dumps(summary))
    recs = [{"stage": "grpo", "step": i + 1, "acc": 0.5, "length": 30.0,
             "reflection": {"mul2": {"reflect_rate": r, "catch_rate": None}}}
            for i, r in enumerate(rates_per_step)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_the_experiment_report_averages_seeds_as_a_hand_count_does(tmp_path):
    # reflect arm: reflect rates 0.2 and 0.4 before (mean 0.30), 0.1 and 0.0 after (0.05); GRPO
    # steps 1-10 at 0.5 then 10 steps at 0.1 (seed 0), all 20 at 0.3 (seed 1): first 0.40, last 0.20
    fake_run(tmp_path, "reflect-0", 0, 0.2, 0.1, [0.5] * 10 + [0.1] * 10)
    fake_run(tmp_path, "reflect-1", 1, 0.4, 0.0, [0.3] * 20)
    fake_run(tmp_path, "plain-0", 0, 0.0, 0.0, [0.0] * 20)
    (tmp_path / "plain-0.log").write_text("a log beside the runs is not a run")
    report.compare_arms(str(tmp_path))
    md = (tmp_path / "aha.md").read_text()
    assert "(reflect: 2 seeds, plain: 1 seed)" in md
    assert "| reflect rate | 0.30 (0.20-0.40) | 0.05 (0.00-0.10) | 0.00 | 0.00 |" in md
    assert "| mul2 reflect rate | 0.40 (0.30-0.50) | 0.20 (0.10-0.30) | 0.00 | 0.00 |" in md
    assert "| mul2 catch rate | - | - | - | - |" in md                      # no cases: no number
    assert (tmp_path / "aha.png").stat().st_size > 10_000


def test_the_experiment_report_says_what_it_needs(tmp_path):
    def compare():
        r = subprocess.run([sys.executable, "report.py", "compare", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        return r.stderr
    assert "needs reflect-<seed>/ and plain-<seed>/" in compare()
    fake_run(tmp_path, "reflect-0", 0, 0.2, 0.1, [0.5] * 3)
    fake_run(tmp_path, "plain-0", 0, 0.0, 0.0, [0.0] * 3)
    summary = json.loads((tmp_path / "plain-0" / "summary.json").read_text())
    del summary["final"]                                           # --stage pretrain's summary
    (tmp_path / "plain-0" / "summary.json").write_text(json.dumps(summary))
    assert "plain-0: no GRPO result" in compare()
