"""The arithmetic task: deterministic generators, answers that are true, worked solutions whose every
column step is a true one-digit fact, a held-out split that never leaks into training, and
pretraining rows packed with whole documents."""
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import nanor1
from data import LEVELS, is_heldout, make_problem, training_problems
from data import test_set as make_test_set
from nanor1 import END_ANSWER, EOT, THINK, enc

# -----------------------------------------------------------------------------
# An independent evaluator: recursive descent over integers, + - * and parentheses (no eval).
#   expr := term (('+' | '-') term)*     term := factor ('*' factor)*     factor := INT | '(' expr ')'


def evaluate_expr(text: str) -> int:
    pos = 0

    def peek():
        return text[pos] if pos < len(text) else ""

    def take(ch):
        nonlocal pos
        assert peek() == ch, f"expected {ch!r} at {pos} in {text!r}"
        pos += 1

    def factor():
        nonlocal pos
        if peek() == "(":
            take("(")
            v = expr()
            take(")")
            return v
        start = pos
        while peek() and peek() in "0123456789":
            pos += 1
        assert pos > start, f"expected a number at {start} in {text!r}"
        return int(text[start:pos])

    def term():
        v = factor()
        while peek() == "*":
            take("*")
            v *= factor()
        return v

    def expr():
        v = term()
        while peek() in ("+", "-") and peek():
            op = peek()
            take(op)
            v = v + term() if op == "+" else v - term()
        return v

    v = expr()
    assert pos == len(text), f"trailing text in {text!r}"
    return v


@pytest.mark.parametrize("text,value", [("1+2*3", 7), ("(1+2)*3", 9), ("10-4-3", 3), ("2*3*4", 24),
                                        ("(47+85)*3-29", 367), ("((7))", 7), ("100-(5-3)*2", 96)])
def test_reference_parser_itself(text, value):
    assert evaluate_expr(text) == value


# -----------------------------------------------------------------------------
# An independent checker of worked solutions

OP_RE = re.compile(r"^(\d+)([+\-*])(\d+):([^>]*)>(\d+)$")
ADD_RE = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)$")
SUB_RE = re.compile(r"^(\d+)-(\d)(-1)?=(\d)$")
MUL_RE = re.compile(r"^(\d)\*(\d)(?:\+(\d+))?=(\d+)$")


def digit(n: int, i: int) -> int:
    return n // 10 ** i % 10


def check_operation(step: str):
    """Check one 'a op b:col,col,...>result' against school arithmetic; return (a, op, b, result)."""
    m = OP_RE.match(step)
    assert m, f"malformed operation {step!r}"
    a, op, b, cols, result = int(m[1]), m[2], int(m[3]), m[4].split(","), int(m[5])
    if op == "+":
        assert len(cols) == max(len(str(a)), len(str(b))), step
        carry, value = 0, 0
        for i, col in enumerate(cols):
            c = ADD_RE.match(col)
            assert c, f"malformed addition column {col!r} in {step!r}"
            x, y, plus1, s = int(c[1]), int(c[2]), c[3] is not None, int(c[4])
            assert (x, y) == (digit(a, i), digit(b, i)), f"column {i} of {step!r} uses the wrong digits"
            assert plus1 == (carry == 1), f"carry not chained into column {i} of {step!r}"
            assert s == x + y + carry, f"false fact {col!r} in {step!r}"
            value += s % 10 * 10 ** i
            carry = s // 10
        value += carry * 10 ** len(cols)
        assert value == a + b
    elif op == "-":
        assert a >= b, step
        assert len(cols) == max(len(str(a)), len(str(b))), step
        borrow, value = 0, 0
        for i, col in enumerate(cols):
            c = SUB_RE.match(col)
            assert c, f"malformed subtraction column {col!r} in {step!r}"
            t, y, minus1, d = int(c[1]), int(c[2]), c[3] is not None, int(c[4])
            x = digit(a, i)
            assert y == digit(b, i), f"column {i} of {step!r} uses the wrong digit of {b}"
            assert minus1 == (borrow == 1), f"borrow not paid in column {i} of {step!r}"
            needs_borrow = x - y - borrow < 0
            assert t == (x + 10 if needs_borrow else x), f"top digit of column {i} wrong in {step!r}"
            assert d == t - y - borrow, f"false fact {col!r} in {step!r}"
            assert 0 <= d <= 9
            value += d * 10 ** i
            borrow = int(needs_borrow)
        assert borrow == 0, f"{step!r} ends owing a borrow"
        assert value == a - b
    else:
        assert 0 <= b <= 9, step
        assert len(cols) == len(str(a)), step
        carry, value = 0, 0
        for i, col in enumerate(cols):
            c = MUL_RE.match(col)
            assert c, f"malformed multiplication column {col!r} in {step!r}"
            d, mult, cin, p = int(c[1]), int(c[2]), int(c[3]) if c[3] is not None else 0, int(c[4])
            assert d == digit(a, i) and mult == b, f"column {i} of {step!r} uses the wrong digits"
            assert cin == carry and (c[3] is None) == (carry == 0), f"carry not chained into column {i} of {step!r}"
            assert c[3] is None or cin > 0, f"'+0' carry written in {step!r}"
            assert p == d * mult + cin, f"false fact {col!r} in {step!r}"
            value += p % 10 * 10 ** i
            carry = p // 10
        value += carry * 10 ** len(cols)
        assert value == a * b
    assert result == {"+": a + b, "-": a - b, "*": a * b}[op], f"result after '>' is wrong in {step!r}"
    assert value == result
    return a, op, b, result


def check_solution(p):
    ops = [check_operation(s) for s in p.solution.split(" ")]
    for (_, _, _, prev), (a, _, _, _) in zip(ops, ops[1:]):
        assert a == prev, f"step does not start from the previous result in {p.solution!r}"
    assert ops[-1][3] == p.answer
    # the operations are the problem's own operations, in order
    nums = [int(n) for n in re.findall(r"\d+", p.text)]
    symbols = re.findall(r"[+\-*]", p.text)
    assert [o[1] for o in ops] == symbols
    assert [o[2] for o in ops] == nums[1:]
    assert ops[0][0] == nums[0]
    return ops


@pytest.mark.parametrize("solution", [
    "347+285:7+5=12,4+8+1=13,3+2+1=6>632",
    "702-158:12-8=4,10-5-1=4,7-1-1=5>544",
    "347*6:7*6=42,4*6+4=28,3*6+2=20>2082",
    "396-29:16-9=7,9-2-1=6,3-0=3>367",
])
def test_checker_accepts_the_documented_examples(solution):
    check_operation(solution)


@pytest.mark.parametrize("solution", [
    "347+285:7+5=12,4+8=12,3+2+1=6>632",       # carry dropped
    "702-158:12-8=4,10-5=5,7-1-1=5>554",       # borrow not paid
    "347*6:7*6=42,4*6+4=28,3*6+2=21>2182",     # false fact
    "47+85:7+5=12,4+8+1=13>131",               # wrong result
])
def test_checker_rejects_wrong_solutions(solution):
    with pytest.raises(AssertionError):
        check_operation(solution)


# -----------------------------------------------------------------------------
# Generators


def test_same_seed_gives_the_same_stream():
    a = [next(g) for g in [training_problems(random.Random(7))] for _ in range(500)]
    b = [next(g) for g in [training_problems(random.Random(7))] for _ in range(500)]
    assert a == b
    for level in LEVELS:
        r1, r2 = random.Random(3), random.Random(3)
        assert [make_problem(level, r1) for _ in range(50)] == [make_problem(level, r2) for _ in range(50)]


def test_different_seeds_give_different_streams():
    a = [p.text for p in (lambda g: [next(g) for _ in range(200)])(training_problems(random.Random(1)))]
    b = [p.text for p in (lambda g: [next(g) for _ in range(200)])(training_problems(random.Random(2)))]
    assert a != b
    assert len(set(a) & set(b)) < 50


def test_training_stream_covers_every_level():
    g = training_problems(random.Random(0))
    counts = {lvl: 0 for lvl in LEVELS}
    for _ in range(2000):
        counts[next(g).level] += 1
    assert all(c > 350 for c in counts.values()), counts   # uniform: 500 each


@pytest.mark.parametrize("weights", [[1, 1, 1, 2], [0, 3, 0, 1], [0, 0, 0, 1]])
def test_level_weights_set_the_share_of_each_level(weights):
    g = training_problems(random.Random(0), weights=weights)
    n = 4000
    counts = {lvl: 0 for lvl in LEVELS}
    for _ in range(n):
        counts[next(g).level] += 1
    for lvl, w in zip(LEVELS, weights):
        expected = n * w / sum(weights)
        # binomial: 4.5 standard deviations either side (a level of weight 0 never appears)
        sd = (n * (w / sum(weights)) * (1 - w / sum(weights))) ** 0.5
        assert abs(counts[lvl] - expected) <= 4.5 * sd, (lvl, counts, weights)


def test_the_default_pretraining_mix_is_one_third_multi():
    """--level_weights 1,1,2,2: the documents of pretraining rows are multi 1/3 of the time."""
    cfg = nanor1.Config(block_size=128)
    assert nanor1.level_weights(cfg) == [1.0, 1.0, 2.0, 2.0]
    x, _ = next(nanor1.pretrain_batches(cfg, random.Random(0), 400))
    docs = [d for row in x.tolist() for d in enc.decode(row).split("<|endoftext|>") if "=" in d]
    multi = sum(d.startswith("(") for d in docs)
    # ~1600 documents: 4.5 standard deviations of the share are 0.055; the at most 16 documents
    # still queued when the batch ends (long ones are likelier to wait) shift it by 1% at most
    assert len(docs) > 1000 and abs(multi / len(docs) - 1 / 3) < 0.065, (multi, len(docs))


TEXT_RE = {"add2": r"\d{2}[+-]\d{2}", "add3": r"\d{3}[+-]\d{3}", "mul": r"\d{2,3}\*[2-9]",
           "multi": r"\(\d{2}[+-]\d{2}\)\*[2-9][+-]\d{2}"}


@pytest.mark.parametrize("level", LEVELS)
def test_every_answer_equals_an_independent_evaluation(level):
    rng = random.Random(f"answers-{level}")
    for _ in range(2000):
        p = make_problem(level, rng)
        assert p.level == level
        assert re.fullmatch(TEXT_RE[level], p.text), p.text
        assert isinstance(p.answer, int) and p.answer >= 0
        assert p.answer == evaluate_expr(p.text), p


@pytest.mark.parametrize("level", LEVELS)
def test_every_worked_solution_step_is_true(level):
    rng = random.Random(f"solutions-{level}")
    n_ops = {"add2": 1, "add3": 1, "mul": 1, "multi": 3}[level]
    for _ in range(2000):
        p = make_problem(level, rng)
        ops = check_solution(p)
        assert len(ops) == n_ops


def test_documents_have_the_r1_shape():
    p = data.Problem("multi", "(47+85)*3-29", 367, "47+85:7+5=12,4+8+1=13>132 132*3:2*3=6,3*3=9,1*3=3>396 "
                     "396-29:16-9=7,9-2-1=6,3-0=3>367")
    check_solution(p)
    assert p.document(think=False) == "(47+85)*3-29=<answer>367</answer>"
    assert p.document(think=True) == f"(47+85)*3-29=<think>{p.solution}</think><answer>367</answer>"


def test_column_steps_rejects_unsupported_operations():
    for args in ((12, "-", 30), (12, "*", 13), (-1, "+", 3), (5, "/", 2)):
        with pytest.raises(ValueError):
            data.column_steps(*args)


# -----------------------------------------------------------------------------
# Held-out split


def test_training_problems_never_meet_the_test_set():
    tests = make_test_set(200)
    held = {p.text for ps in tests.values() for p in ps}
    assert len(held) == 200 * len(LEVELS)
    n = 0
    for seed in range(4):
        g = training_problems(random.Random(seed))
        for _ in range(5000):
            p = next(g)
            assert p.text not in held
            assert not is_heldout(p.text)
            n += 1
    assert n == 20000


def test_test_set_problems_are_all_held_out_distinct_and_correct():
    tests = make_test_set(100, seed=3)
    assert list(tests) == list(LEVELS)
    for level, ps in tests.items():
        assert len(ps) == 100
        assert len({p.text for p in ps}) == 100
        for p in ps:
            assert p.level == level
            assert is_heldout(p.text)
            assert p.answer == evaluate_expr(p.text)
            check_solution(p)


def test_test_set_is_deterministic():
    assert make_test_set(50) == make_test_set(50)
    assert make_test_set(20, seed=1) == make_test_set(20, seed=1)
    assert make_test_set(20, seed=0) != make_test_set(20, seed=1)


def all_add2_texts() -> set:
    """Every add2 problem text, enumerated: a+b and a-b (a >= b) for two-digit a, b."""
    return {f"{a}{op}{b}" for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b}


def test_test_set_gives_what_it_is_asked_for_or_refuses():
    """add2 has exactly as many held-out problems as the enumeration finds (636): asking for all of
    them gives all of them, distinct; one more is refused with a ValueError naming the level and
    the count. Guards against a test set that silently comes back short or with repeats, and
    against one that refuses what it has."""
    held = {t for t in all_add2_texts() if is_heldout(t)}
    assert len(held) == 636
    tests = make_test_set(len(held), levels=("add2",))
    assert list(tests) == ["add2"]
    texts = [p.text for p in tests["add2"]]
    assert len(texts) == len(held) and set(texts) == held          # exactly n, distinct, all held out
    with pytest.raises(ValueError, match=r"level add2 has only 636 distinct held-out problems, 637 were asked for"):
        make_test_set(len(held) + 1, levels=("add2",))


def test_heldout_bucket_is_about_one_in_twenty():
    rng = random.Random(11)
    texts = {make_problem(lvl, rng).text for lvl in LEVELS for _ in range(5000)}
    share = sum(map(is_heldout, texts)) / len(texts)
    assert 0.035 < share < 0.065, share


# -----------------------------------------------------------------------------
# Pretraining batches

DOC_RE = re.compile(r"(?P<text>[0-9()+\-*]+)=(?:<think>(?P<sol>[^<]+)</think>)?<answer>(?P<ans>\d+)</answer>")


def split_rows(cfg, batches, n_batches):
    """Yield (row tokens incl. the target of the last position, y row, documents of the row)."""
    for _ in range(n_batches):
        x, y = next(batches)
        assert x.shape == y.shape and x.shape[1] == cfg.block_size
        assert x.dtype == torch.long and y.dtype == torch.long
        for xr, yr in zip(x.tolist(), y.tolist()):
            full = xr + [yr[-1] if yr[-1] != -1 else EOT]          # the block_size + 1 packed tokens
            yield full, yr


def parse_row(full):
    """-> (documents as strings, index just past the last document)."""
    assert full[0] == EOT, "a row must start with a document"
    assert END_ANSWER in full, "a row holds at least one document"
    end = len(full) - full[::-1].index(END_ANSWER)
    assert all(t == EOT for t in full[end:]), "only padding after the last document"
    docs, cur = [], None
    for t in full[:end]:
        if t == EOT:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return [enc.decode(d) for d in docs], end


def test_pretrain_rows_are_whole_documents_with_shifted_targets():
    cfg = nanor1.Config(block_size=128, think_frac=0.3)
    batches = nanor1.pretrain_batches(cfg, random.Random(5), rows=8)
    n_docs = 0
    n_eot_targets = 0
    for full, y in split_rows(cfg, batches, 20):
        docs, end = parse_row(full)
        n_eot_targets += y.count(EOT)
        for d in docs:
            m = DOC_RE.fullmatch(d)
            assert m, f"not a whole document: {d!r}"
            assert int(m["ans"]) == evaluate_expr(m["text"])
            assert not is_heldout(m["text"])
            n_docs += 1
        for i in range(cfg.block_size):
            if i + 1 < end:
                assert y[i] == full[i + 1], "targets are the inputs shifted by one"
            elif i + 1 == end:   # the end-of-text right after the last document: a target (learn
                assert y[i] in (EOT, -1)  # to stop) or padding; both are sound
            else:
                assert y[i] == -1, "padding targets are -1"
    assert n_docs > 8 * 20
    assert n_eot_targets >= n_docs - 8 * 20, "the model is taught the end-of-text between documents"


def test_pretrain_worked_solutions_are_true():
    cfg = nanor1.Config(block_size=128, think_frac=1.0)
    batches = nanor1.pretrain_batches(cfg, random.Random(6), rows=4)
    for full, _ in split_rows(cfg, batches, 10):
        for d in parse_row(full)[0]:
            m = DOC_RE.fullmatch(d)
            assert m["sol"] is not None
            check_solution(data.Problem("?", m["text"], int(m["ans"]), m["sol"]))


@pytest.mark.parametrize("think_frac", [0.0, 0.25, 1.0])
def test_pretrain_share_of_worked_solutions_matches_think_frac(think_frac):
    cfg = nanor1.Config(block_size=128, think_frac=think_frac)
    batches = nanor1.pretrain_batches(cfg, random.Random(8), rows=16)
    think = total = 0
    for full, _ in split_rows(cfg, batches, 60):
        docs, _ = parse_row(full)
        total += len(docs)
        think += sum("<think>" in d for d in docs)
    assert total > 1500
    assert abs(think / total - think_frac) < 0.04, (think, total)


def test_pretrain_batches_are_deterministic_per_rng_seed():
    cfg = nanor1.Config(block_size=128)
    a = nanor1.pretrain_batches(cfg, random.Random(1), rows=4)
    b = nanor1.pretrain_batches(cfg, random.Random(1), rows=4)
    c = nanor1.pretrain_batches(cfg, random.Random(2), rows=4)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


def test_pretrain_batches_refuse_a_block_shorter_than_a_document():
    cfg = nanor1.Config(block_size=16, think_frac=1.0)
    with pytest.raises(SystemExit):
        next(nanor1.pretrain_batches(cfg, random.Random(0), rows=2))


def test_think_token_only_in_worked_documents():
    """The <think> special token appears exactly where the document text says <think>."""
    cfg = nanor1.Config(block_size=128, think_frac=0.5)
    batches = nanor1.pretrain_batches(cfg, random.Random(9), rows=4)
    for full, _ in split_rows(cfg, batches, 5):
        docs, end = parse_row(full)
        assert full[:end].count(THINK) == sum("<think>" in d for d in docs)


# -----------------------------------------------------------------------------
# Problems a person types (--stage sample): data.parse_problem reads untrusted text

def test_every_generated_problem_reads_back_as_itself():
    """A second path to the same Problem: the generator writes it, the parser reads it back, with
    its level, answer and worked solution; spaces around operators and a final "=" are allowed."""
    rng = random.Random(7)
    for level in LEVELS:
        for _ in range(300):
            p = make_problem(level, rng)
            assert data.parse_problem(p.text) == p
            spaced = re.sub(r"([+\-*()])", r" \1 ", p.text) + " = "
            assert data.parse_problem(spaced) == p


def random_expression(rng, depth=0):
    """(text, value) of a random expression over + - * and parentheses, its value computed as it
    is built (a third path, besides the parser under test and evaluate_expr above)."""
    if depth > 3 or rng.random() < 0.3:
        n = rng.choice([0, 1, 7, 10, 99, 100, 12345, 10 ** 30])
        return str(n), n
    (a, va), (b, vb) = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    op = rng.choice("+-*")
    wrap = lambda t: f"({t})"
    a, b = wrap(a), wrap(b)   # parenthesised, so the value does not depend on precedence
    value = va + vb if op == "+" else va - vb if op == "-" else va * vb
    return a + op + b, value


def test_typed_expressions_get_their_true_value():
    rng = random.Random(3)
    for _ in range(500):
        text, value = random_expression(rng)
        p = data.parse_problem(text)
        assert p.answer == value == evaluate_expr(text), text
        assert p.text == text and p.level == data.OUTSIDE   # every operand in parentheses
    for text, value in (("1+2*3", 7), ("10-4-3", 3), ("2*3*4+1", 25), ("100-(5-3)*2", 96)):
        assert data.parse_problem(text).answer == value   # precedence and left associativity


@pytest.mark.parametrize("text, level", [
    ("47+85", "add2"), ("99-10", "add2"), ("55-55", "add2"), ("347+285", "add3"), ("10*2", "mul"),
    ("999*9", "mul"), ("(47+85)*3-29", "multi"), ("(85-47)*3+29", "multi"),
    # outside what the model was trained on: other digits, other shapes, below zero
    ("100+5", "outside"), ("5+5", "outside"), ("1234+5678", "outside"), ("347*12", "outside"),
    ("347*1", "outside"), ("07+85", "outside"), ("12-47", "outside"), ("(12-47)*3+99", "outside"),
    ("(10+10)*2-99", "outside"), ("(47+85)*3", "outside"), ("1+2+3", "outside"),
    ("(47+85)*10-29", "outside"), ("((47+85))*3-29", "outside")])
def test_a_typed_problem_has_the_level_of_its_shape_or_none(text, level):
    p = data.parse_problem(text)
    assert p.level == level, (text, p)
    assert (p.solution != "") == (level != "outside")


@pytest.mark.parametrize("text, says", [
    ("", "empty"), ("  =", "empty"), ("abc", "expected a number"), ("47+", "found the end"),
    ("(47+85", "found the end"), ("47+85)", "found ')'"), ("47++85", "found '+'"),
    ("-5+3", "found '-'"), ("2**3", "found '*'"), ("4 7+85", "space between two digits"),
    ("٣+1", "found '٣'"), ("47+85=12", "found '='"), ("47/5", "found '/'"),
    ("eval('1')", "expected a number"), ("<think>1+1", "found '<'"),
    ("(" * 60 + "1" + ")" * 60, "nested more than"), ("1+" * 600 + "1", "characters, more than")])
def test_text_that_is_not_a_problem_is_a_value_error_saying_why(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        data.parse_problem(text)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text(alphabet="0123456789+-*() =\n<>a٣", max_size=60))
def test_any_text_is_a_problem_or_a_value_error(text):
    try:
        p = data.parse_problem(text)
    except ValueError:
        return
    assert set(p.text) <= set("0123456789+-*()") and p.prompt == p.text + "="
    assert p.answer == evaluate_expr(p.text)
