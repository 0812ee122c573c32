"""out/samples.html: one self-contained page of what the model wrote. Read back with html.parser,
it holds exactly the completions it was given, as text: model output is untrusted and never
becomes markup, whatever it contains. A real tiny run's page shows the base and the final model's
greedy answers (checked against a plain argmax loop) and, for each GRPO evaluation step, one group
of its sampled completions with rewards and advantages (recomputed here)."""
import json
import math
from html.parser import HTMLParser

import pytest
import torch

import data
import nanor1
import plumbing
import report
from marks import ALL, needs

# the page's own vocabulary: anything else in it was injected
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table",
             "tr", "th", "td", "span", "code", "br"}
ADVERSARIAL = ["<script>alert('XSS1')</script>", "</td></tr></table><b>XSS2</b>", "&amp; &lt; &#60;",
               "\"quoted\" 'single' `back`", "<think>a</think><answer><img src=x onerror=XSS3>"
               "</answer>", "</code></span><style>body{display:none}</style>", "<!-- XSS4",
               "]]><![CDATA[x", "<think>unclosed", "</answer></think>stray", "", "\u202e\U0001F600 ok",
               "<think>47+85:7+5=12,4+8+1=13>132</think><answer>132</answer>"]


class Page(HTMLParser):
    """Every start tag with its attributes; the text of each <code class="completion">; the text
    outside them."""

    def __init__(self):
        super().__init__()
        self.tags, self.completions, self.outside, self.depth = [], [], [], 0
        self.in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.in_style = tag == "style"
        if self.depth:
            self.depth += 1
        elif tag == "code" and dict(attrs).get("class") == "completion":
            self.depth = 1
            self.completions.append("")

    def handle_endtag(self, tag):
        self.in_style = False
        if self.depth:
            self.depth -= 1

    def handle_data(self, text):
        if self.in_style:
            return   # the page's own CSS
        if self.depth:
            self.completions[-1] += text
        else:
            self.outside.append(text)


def read_page(path) -> Page:
    page = Page()
    page.feed(open(path, encoding="utf-8").read())
    page.close()
    return page


def held_out_record(p, completion, i=0):
    """What evaluate keeps of a completion; right and well formed as given (the page only shows
    them: the rewards are tested elsewhere)."""
    return dict(p.record(completion), right=i % 3 == 0, well_formed=i % 2 == 0)


def test_the_page_holds_exactly_the_completions_it_was_given_as_text(tmp_path):
    tests = data.test_set(2)
    problems = [p for lvl in data.LEVELS for p in tests[lvl]]                  # 8, 2 per level
    base = [held_out_record(p, ADVERSARIAL[i % len(ADVERSARIAL)], i)
            for i, p in enumerate(problems)]
    final = [held_out_record(p, ADVERSARIAL[-1 - i % len(ADVERSARIAL)], i + 1)
             for i, p in enumerate(problems)]
    p = problems[0]
    grpo = [{"stage": "grpo", "step": step, "reward": 0.5, "acc": 0.4, "think": 0.3,
             "heldout": {"overall": {"accuracy": 0.25, "think_rate": 0.5}},
             "samples": [{"problem": p.text, "answer": p.answer, "completion": text,
                          "reward": 0.2 * k, "advantage": 0.1 * k - 0.3, "right": k % 2 == 0}
                         for k, text in enumerate(ADVERSARIAL[step:step + 6])]}
            for step in (5, 10)]
    with open(tmp_path / "metrics.jsonl", "w") as f:   # what grpo logs, and a line a kill cut
        f.writelines(json.dumps(r) + "\n" for r in
                     [{"stage": "pretrain", "step": 1, "loss": 1.0}] + grpo)
        f.write('{"stage": "grpo", "step": 11, "sampl')
    cfg = nanor1.Config(out_dir=str(tmp_path))
    report.write_samples_page(cfg, {"base": base, "final": final})
    page = read_page(tmp_path / "samples.html")

    assert {tag for tag, _ in page.tags} <= PAGE_TAGS, "a completion became markup"
    assert [tag for tag, _ in page.tags if tag in ("html", "head", "style", "body")] == \
        ["html", "head", "style", "body"]
    for tag, attrs in page.tags:
        assert not {"src", "href"} & set(attrs), "the page loads nothing from anywhere"
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
    # per level, problem by problem: the base's completion, then the final model's; then the steps
    expected = [c for b, f in zip(base, final) for c in (b["completion"], f["completion"])]
    expected += [s["completion"] for r in grpo for s in r["samples"]]
    assert page.completions == expected
    outside = "".join(page.outside)
    assert "XSS" not in outside, "model text escaped its cell"
    for r in grpo:
        assert f"GRPO step {r['step']}" in outside
    assert "GRPO step 11" not in outside
    for p in problems:
        assert f"{p.text}=" in outside
    assert outside.count("\u2713 right") == sum(r["right"] for r in base + final) + \
        sum(s["right"] for r in grpo for s in r["samples"])
    assert outside.count("not well formed") == sum(not r["well_formed"] for r in base + final)


def test_without_grpo_steps_the_page_shows_the_held_out_answers_alone(tmp_path):
    p = data.test_set(1)["mul"][0]
    cfg = nanor1.Config(out_dir=str(tmp_path), stage="eval")    # no metrics.jsonl at all
    report.write_samples_page(cfg, {"base": [held_out_record(p, "<answer>1</answer>")],
                                    "final": []})
    page = read_page(tmp_path / "samples.html")
    assert page.completions == ["<answer>1</answer>"]
    outside = "".join(page.outside)
    assert "the model loaded" in outside and "GRPO step" not in outside and "after GRPO" not in outside


TINY = ["--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "32", "--n_layers", "2",
        "--n_heads", "2", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8", "--qk_rope_head_dim",
        "8", "--v_head_dim", "8", "--n_routed_experts", "4", "--n_activated_experts", "2",
        "--pretrain_steps", "4", "--batch_size", "4", "--warmup_steps", "2", "--log_every", "2",
        "--eval_every", "0", "--grpo_steps", "2", "--prompts_per_step", "2", "--group_size", "4",
        "--max_new_tokens", "12", "--n_test", "2", "--grpo_eval_n", "1", "--grpo_eval_every", "1",
        "--device", "cpu", "--threads", "1"]


def argmax_completion(model, p, max_new_tokens) -> str:
    """Greedy decoding by the plain loop: the whole sequence again at each step, no cache."""
    seq, new = nanor1.prompt_tokens(p), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(torch.tensor([seq + new]))[0][0, -1].argmax().item()
            if nxt == nanor1.EOT:
                break
            new.append(nxt)
    return nanor1.enc.decode(new)


@needs(*ALL)
def test_a_run_writes_the_base_and_final_answers_and_each_evaluation_steps_group(tmp_path):
    nanor1.main(["--out_dir", str(tmp_path), *TINY])
    page = read_page(tmp_path / "samples.html")
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    tests = data.test_set(2)
    base, final = (plumbing.load_checkpoint(str(tmp_path / f), torch.device("cpu"))[0].eval()
                   for f in ("base.pt", "final.pt"))
    expected = [argmax_completion(m, p, 12) for lvl in data.LEVELS for p in tests[lvl]
                for m in (base, final)]
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in recs if r["stage"] == "grpo"]
    assert [len(r["samples"]) for r in steps] == [4, 4], "each evaluation step: its first group"
    # a held-out look at step 1 (--grpo_eval_every 1); the last step's is the final evaluation
    assert ["heldout" in r for r in steps] == [True, False]
    for r in steps:
        group = r["samples"]
        assert len({s["problem"] for s in group}) == 1
        rewards = [s["reward"] for s in group]
        mean = sum(rewards) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / 3)             # unbiased, as GRPO
        for s in group:
            right = nanor1.parse_answer(s["completion"]) == s["answer"]
            formatted = nanor1.format_reward(s["completion"]) == 1.0
            assert s["right"] == right
            assert s["reward"] == pytest.approx(1.0 * right + 0.2 * formatted)
            assert s["advantage"] == pytest.approx((s["reward"] - mean) / (std + 1e-4), abs=1e-5)
        expected += [s["completion"] for s in group]
    assert page.completions == expected
