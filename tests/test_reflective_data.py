"""The edge level and the reflective worked solutions (data/arith.py), checked by an evaluator
written here: every column fact, result, check and verdict is true arithmetic except the one
error put in on purpose, and taking the reflection out gives back the plain worked solution."""
import itertools
import os
import random
import re

import pytest

import data
import nanor1
from data import ALL_LEVELS, EDGE_LEVEL, make_problem, reflective_solution
from data.reflect import completion_counts
from plumbing import UNLEARNED, pack_rows

OP = re.compile(r"(\d+)([+*-])(\d+):([^>]*)>(\d+)")          # one operation: header:columns>result
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMN = re.compile(r"(\d+)([+*-])(\d+)(?:([+-])(\d+))?=(\d+)")


def column_is_true(col: str) -> bool:
    """x op y [+-c] = v as plain integer arithmetic (the one-digit fact the column states)."""
    x, op, y, op2, c, v = COLUMN.fullmatch(col).groups()
    lhs = int(x) + int(y) if op == "+" else int(x) - int(y) if op == "-" else int(x) * int(y)
    if op2:
        lhs = lhs + int(c) if op2 == "+" else lhs - int(c)
    return lhs == int(v)


def value(a: str, op: str, b: str) -> int:
    return int(a) + int(b) if op == "+" else int(a) - int(b) if op == "-" else int(a) * int(b)


def operations(trace: str) -> list:
    """Every operation in a trace (checks and redos too): (a, op, b, columns, result)."""
    return [(a, op, b, [c for part in cols.split(",") for c in part.split(" wait ")], r)
            for a, op, b, cols, r in OP.findall(trace)]


def plain_again(trace: str) -> str:
    """The trace with its reflection taken out: a retried column keeps only its redo, a check that
    says ok goes, and an operation a check rejects goes with the check."""
    trace = re.sub(r"[^ ]+ check [^ ]+ no wait ", "", trace)       # no spaces inside an operation
    trace = re.sub(r" check [^ ]+ ok", "", trace)
    return re.sub(r"[^ ,:]+ wait ", "", trace)                     # "4+8+1=14 wait 4+8+1=13"


def problems(n=150, seed=0):
    rng = random.Random(seed)
    return [make_problem(level, rng) for level in ALL_LEVELS for _ in range(n)]


def test_the_edge_level_is_two_digits_times_two_digits_done_in_columns():
    for p in problems():
        if p.level != EDGE_LEVEL:
            continue
        a, b = map(int, re.fullmatch(r"(\d\d)\*(\d\d)", p.text).groups())
        assert p.answer == a * b
        ops = operations(p.solution)
        assert [(int(x), o, int(y)) for x, o, y, _, _ in ops] == \
            [(a, "*", b % 10), (a, "*", b // 10), (a * (b // 10) * 10, "+", a * (b % 10))]
        for x, o, y, cols, r in ops:
            assert int(r) == value(x, o, y) and all(map(column_is_true, cols)), p.solution
        assert data.parse_problem(p.text) == p                    # a person may type it too


@pytest.mark.parametrize("form", ["retry", "verify"])
def test_reflective_solutions_are_true_but_for_the_one_error_they_catch(form):
    rng = random.Random(form)
    seen = {"wait": 0, "ok": 0, "no": 0}
    for p in problems():
        trace, errors = reflective_solution(p.ops, form, rng)
        assert plain_again(trace) == p.solution, trace
        ops = operations(trace)
        false_columns = [c for *_, cols, _ in ops for c in cols if not column_is_true(c)]
        wrong_results = [o for o in ops if int(o[4]) != value(*o[:3])]
        if form == "retry":
            seen["wait"] += 1
            assert trace.count(" wait ") == 1 and " check " not in trace
            bad, redo = re.search(r"([^,:]+) wait ([^,>]+)", trace).groups()
            assert false_columns == [bad] and column_is_true(redo) and not wrong_results
            assert bad.split("=")[0] == redo.split("=")[0]         # the same column, redone
            (a, b), = errors                                       # the span: its wrong value
            assert trace[a:b] == bad.split("=")[1] and trace[b:].startswith(" wait ")
            continue
        m = re.search(r"(\d+)([+*-])(\d+):[^>]*>(\d+) check (\d+)([+*-])(\d+):[^>]*>(\d+) (ok|no)",
                      trace)
        a, op, b, r, x, cop, y, got, verdict = m.groups()
        assert trace.count(" check ") == 1
        # the check is the inverse operation (r-b or r+b, giving a) or the recomputation (of *)
        expected = {"+": (r, "-", b, a), "-": (r, "+", b, a), "*": (a, "*", b, r)}[op]
        assert (x, cop, y) == expected[:3] and int(got) == value(x, cop, y)
        assert (verdict == "ok") == (int(got) == int(expected[3])) == (int(r) == value(a, op, b))
        seen[verdict] += 1
        if verdict == "ok":
            assert not false_columns and not wrong_results and not errors
        else:                                  # one wrong column, its wrong result, then the redo
            assert len(false_columns) == 1 and len(wrong_results) == 1
            assert wrong_results[0][:3] == (a, op, b) and " no wait " + f"{a}{op}{b}:" in trace
            (s, e), = errors
            assert trace[s:e] == false_columns[0].split("=")[1] and trace[e] in ",>"
    assert all(seen[k] > 50 for k in (["wait"] if form == "retry" else ["ok", "no"])), seen


def test_the_parser_credits_the_planted_reflections_exactly():
    """A second path: data/reflect.py, reading the generated traces, finds the planted error
    flagged and fixed, every other claim right and unflagged, every verdict right."""
    rng = random.Random(5)
    for p in problems(40):
        for form in ("retry", "verify"):
            c = completion_counts(f"<think>{reflective_solution(p.ops, form, rng)[0]}</think>"
                                  f"<answer>{p.answer}</answer>")
            assert c["parsed"] == c["reflective"] == 1
            assert c["right_flagged"] == 0 and c["fixed"] == c["flagged"] == c["wrong_flagged"]
            assert c["verdict_right"] == c["checks"] == (form == "verify")
            assert c["wrong"] == (1 if form == "retry" else 2 * c["flagged"])   # column + result
        plain = completion_counts(p.document(True).removeprefix(p.prompt))
        assert plain["parsed"] == 1 and plain["wrong"] == plain["reflective"] == 0


def test_reflective_documents_take_their_share_and_fit_the_row():
    cfg = nanor1.Config(verify_frac=0.3, retry_frac=0.2, think_frac=1.0, edge_weight=1.0,
                        block_size=256)
    docs = nanor1.pretrain_documents(cfg, random.Random(3))
    texts = [nanor1.enc.decode([t % UNLEARNED for t in next(docs)]) for _ in range(3000)]
    checks = sum(" check " in t for t in texts) / len(texts)
    retries = sum(" wait " in t and " check " not in t for t in texts) / len(texts)
    assert all(len(nanor1.encode(t)) <= cfg.block_size for t in texts)
    # the few that do not fit a row are written plain, so the shares come out a little under
    assert 0.25 < checks <= 0.33 and 0.17 < retries <= 0.23, (checks, retries)
    assert sum(bool(re.match(r"\d\d\*\d\d=", t)) for t in texts) > 300    # the edge level too


def test_without_reflection_the_documents_are_what_they_were():
    """verify_frac = retry_frac = 0 draws no extra random numbers: the corpus of every run that
    does not ask for reflection is the one it was before the reflective forms existed."""
    cfg = nanor1.Config()
    docs, rng = nanor1.pretrain_documents(cfg, random.Random(11)), random.Random(11)
    stream = data.training_problems(rng, weights=nanor1.level_weights(cfg))
    for _ in range(500):
        p = next(stream)
        assert next(docs) == nanor1.encode(p.document(think=rng.random() < cfg.think_frac)) + [
            nanor1.EOT]


def aha_flags() -> list:
    """The flag set aha.sh passes to nanor1.py (its AHA=( ... ) array)."""
    text = open(os.path.join(ROOT, "aha.sh")).read()
    return re.search(r"^AHA=\((.*?)\)", text, re.S | re.M).group(1).split()


def test_aha_sh_flags_are_valid_and_make_rows_for_its_longest_documents():
    cfg = nanor1.parse_args(aha_flags())
    assert cfg.edge_weight > 0 and cfg.verify_frac > 0 and cfg.retry_frac > 0
    docs = nanor1.pretrain_documents(cfg, random.Random(0))
    lengths = [len(next(docs)) for _ in range(3000)]
    assert max(lengths) <= cfg.block_size                      # every document fits a row
    assert max(lengths) > 128                                  # which the default's would not hold
    assert cfg.max_new_tokens >= max(lengths)                  # nor would its completions


@pytest.mark.parametrize("flags, says", [
    (["--verify_frac", "1.5"], "--verify_frac=1.5: must be in [0, 1]"),
    (["--verify_frac", "0.6", "--retry_frac", "0.6"], "must be <= 1"),
    (["--edge_weight", "-1"], "--edge_weight=-1.0: must be >= 0"),
    (["--retry_frac", "nan"], "--retry_frac=nan: must be in [0, 1]"),
    (["--verify_frac", "0.1"], "--block_size=128: must be >= 256 with reflective worked solutions")])
def test_bad_reflection_settings_are_one_line_errors(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        nanor1.parse_args(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("mask", [True, False])
def test_planted_errors_are_read_but_never_learned(mask):
    """--mask_errors: the planted wrong value is in the row's inputs, and no target asks for it;
    every other token of the document is a target as usual. Off: the error is learned like the
    rest."""
    cfg = nanor1.Config(verify_frac=0.5, retry_frac=0.5, think_frac=1.0, block_size=256,
                        mask_errors=mask)
    docs, masked = nanor1.pretrain_documents(cfg, random.Random(8)), 0
    for _ in range(200):
        doc = next(docs)
        marked = [i for i, t in enumerate(doc) if t >= UNLEARNED]
        text = nanor1.enc.decode([t % UNLEARNED for t in doc])
        if " wait " not in text:                              # a check that says ok: no error
            assert not marked
            continue
        if not mask:
            assert not marked
            continue
        masked += 1
        plain = [t % UNLEARNED for t in doc]
        wrong = nanor1.enc.decode(plain[marked[0]:marked[-1] + 1])
        assert marked == list(range(marked[0], marked[-1] + 1)) and wrong.isdigit()
        before = nanor1.enc.decode(plain[:marked[0]])
        assert re.search(r"[0-9]+[+*-][0-9]+(?:[+-][0-9]+)?=$", before)   # a column's value
        x, y = pack_rows(itertools.repeat(doc), [], 1, 256, nanor1.EOT)
        row = [nanor1.EOT] + plain                             # a row: end-of-text, then the doc
        assert x[0, :len(plain)].tolist() == row[:len(plain)]
        targets = y[0, :len(plain)].tolist()
        assert [i for i, t in enumerate(targets) if t == -1] == [i - 1 for i in range(
            marked[0] + 1, marked[-1] + 2)]
        assert all(t == row[i + 1] for i, t in enumerate(targets) if t != -1)
    assert masked > 30 or not mask
