"""
Arithmetic problems in graded levels, each with its integer answer and a worked solution.

Levels (easiest first):
    add2   2-digit addition or subtraction           47+85, 91-38
    add3   3-digit addition or subtraction           347+285, 702-158
    mul    2- or 3-digit number times one digit      347*6
    multi  a multi-step expression                   (47+85)*3-29
    mul2   2-digit times 2-digit (the edge level)    47*85

The first four are R1-Zero's levels ("overall" means them). mul2 is at the edge of the tiny
model's competence, where checking and retrying can pay (--edge_weight; the aha-moment runs).

Subtractions never go below zero, so every answer is a non-negative integer.

A worked solution does arithmetic the way it is taught in school: column by column from the
right, each step a one-digit fact plus a carry or borrow, small enough for a tiny transformer.
One operation is written `a op b:column,column,...>result`; a multi-step problem chains one such
operation per step, each starting from the previous result:

    347+285:7+5=12,4+8+1=13,3+2+1=6>632
    702-158:12-8=4,10-5-1=4,7-1-1=5>544        (a top digit +10 when it borrows; -1 pays a borrow)
    347*6:7*6=42,4*6+4=28,3*6+2=20>2082
    (47+85)*3-29 -> 47+85:7+5=12,4+8+1=13>132 132*3:2*3=6,3*3=9,1*3=3>396 396-29:16-9=7,9-2-1=6,3-0=3>367
    47*85 -> 47*5:7*5=35,4*5+3=23>235 47*8:7*8=56,4*8+5=37>376 3760+235:0+5=5,6+3=9,7+2=9,3+0=3>3995

A reflective worked solution (a minority of the corpus, --verify_frac and --retry_frac) adds one
reflection to the plain one (reflective_solution below; data/reflect.py judges them in the model's
own completions):

    retry   347+285:7+5=12,4+8+1=14 wait 4+8+1=13,3+2+1=6>632
    verify  347+285:7+5=12,4+8+1=13,3+2+1=6>632 check 632-285:12-5=7,13-8-1=4,6-2-1=3>347 ok
            347+285:7+5=12,4+8+1=14,3+2+1=6>642 check 642-285:12-5=7,14-8-1=5,6-2-1=3>357 no wait
            347+285:7+5=12,4+8+1=13,3+2+1=6>632     (one line; the check of A+B is R-B, of A-B
            R+B, both should give A; of A*B the recomputation)

Answering directly needs the whole computation in one forward pass; the worked solution needs
only one-digit facts, so on the harder levels thinking is far more accurate than answering.

Held-out split: a problem is held out iff a hash of its text falls in a fixed 1/20 bucket.
Training streams reject such problems and the test set draws only from them, so the two can
never meet, whatever the seeds.

A problem a person types (`python nanor1.py --stage sample --prompt "(47+85)*3-29"`) is read by
parse_problem: parsed, never evaluated, and given the level whose shape it has, or OUTSIDE.
"""
import hashlib
import random
import re
from dataclasses import dataclass, field

LEVELS = ("add2", "add3", "mul", "multi")   # R1-Zero's levels
EDGE_LEVEL = "mul2"                          # at the edge of competence: reported on its own
ALL_LEVELS = LEVELS + (EDGE_LEVEL,)
HELDOUT_BUCKETS = 20   # 1 in 20 problems of each level is reserved for testing
OUTSIDE = "outside"    # the level of a typed problem that has none of the levels' shapes


@dataclass(frozen=True)
class Problem:
    level: str
    text: str        # "(47+85)*3-29"
    answer: int
    solution: str    # the worked solution, without tags
    ops: tuple = field(default=(), compare=False, repr=False)   # its operations: ((a, op, b), ...)

    @property
    def prompt(self) -> str:
        """What the model is asked: "(47+85)*3-29=" (the problem and "=")."""
        return f"{self.text}="

    def record(self, completion: str) -> dict:
        """A fine-tuning example (SFT data, rejection-sampled traces), as the .jsonl files hold it."""
        return dict(level=self.level, problem=self.text, answer=self.answer, prompt=self.prompt,
                    completion=completion)

    def document(self, think: bool, solution: str = "") -> str:
        """One pretraining document: direct answer, or worked solution (by default the plain one)
        then answer."""
        head = f"{self.prompt}<think>{solution or self.solution}</think>" if think else self.prompt
        return f"{head}<answer>{self.answer}</answer>"


def is_heldout(text: str) -> bool:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_BUCKETS == 0


def _digits(n: int) -> list:
    """Digits of n, least significant first: 347 -> [7, 4, 3]."""
    return [int(c) for c in reversed(str(n))]


def column_steps(a: int, op: str, b: int) -> tuple:
    """School column arithmetic for a+b, a-b (a >= b >= 0) or a*b (b one digit).

    Returns (steps, result): one string per column, least significant column first.
    """
    steps = []
    if op == "*":
        if not 0 <= b <= 9:
            raise ValueError(f"column multiplication needs a one-digit multiplier, got {b}")
        carry = 0
        for d in _digits(a):
            p = d * b + carry
            steps.append(f"{d}*{b}" + (f"+{carry}" if carry else "") + f"={p}")
            carry = p // 10
        return steps, a * b
    if op not in "+-" or a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"unsupported column operation {a}{op}{b}")
    da, db = _digits(a), _digits(b)
    da, db = da + [0] * (len(db) - len(da)), db + [0] * (len(da) - len(db))
    carry = 0
    for x, y in zip(da, db):
        if op == "+":
            s = x + y + carry
            steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
            carry = s // 10
        else:
            v = x - y - carry
            top = x + 10 if v < 0 else x
            steps.append(f"{top}-{y}" + ("-1" if carry else "") + f"={v % 10}")
            carry = int(v < 0)
    return steps, a + b if op == "+" else a - b


def operation_solution(a: int, op: str, b: int) -> tuple:
    steps, result = column_steps(a, op, b)
    return f"{a}{op}{b}:{','.join(steps)}>{result}", result


def resolve(ops: list) -> list:
    """ops: [(a, op, b), (None, op, c), ...], None meaning "the previous result" -> the same with
    every operand a number."""
    out, prev = [], None
    for a, op, b in ops:
        a = prev if a is None else a
        out.append((a, op, b))
        prev = a + b if op == "+" else a - b if op == "-" else a * b
    return out


def worked_solution(ops: list) -> tuple:
    """ops as for resolve -> (the worked solution, the final result)."""
    parts = [operation_solution(a, op, b) for a, op, b in resolve(ops)]
    return " ".join(text for text, _ in parts), parts[-1][1]


def mul2_ops(a: int, b: int) -> list:
    """a*b for a two-digit b, as school does it: a times each digit of b, then the partial products
    added, the tens' one shifted by a 0: 47*85 -> 47*5, 47*8, 3760+235."""
    low, high = a * (b % 10), a * (b // 10)
    return [(a, "*", b % 10), (a, "*", b // 10), (high * 10, "+", low)]


# -----------------------------------------------------------------------------
# Reflective worked solutions: the plain one with one retry or one check in it (see the top).
# Everything in them is true arithmetic except the one error put in on purpose, which the
# reflection then catches.

_ERR, _END = "\0", "\1"   # around the planted wrong value while a solution is written


def _wrong_column(step: str, op: str, rng: random.Random) -> tuple:
    """A column step with a wrong value that keeps the step's carry -> (text, value): only the
    digit it writes changes ("4+8+1=13" -> "4+8+1=17"), so the columns after it stay right. The
    value is marked (_ERR, _END) for reflective_solution to find."""
    lhs, v = step.rsplit("=", 1)
    v = int(v)
    wrong = rng.choice([d for d in range(10) if d != v] if op == "-" else
                       [v // 10 * 10 + d for d in range(10) if d != v % 10])
    return f"{lhs}={_ERR}{wrong}{_END}", wrong


def _written_result(op: str, values: list) -> int:
    """The number that column values write (least significant first): each column's last digit;
    the last column of + and * whole, since it holds the final carry."""
    if op == "-":
        return sum(v * 10 ** i for i, v in enumerate(values))
    return sum(v % 10 * 10 ** i for i, v in enumerate(values[:-1])) + \
        values[-1] * 10 ** (len(values) - 1)


def _check(a: int, op: str, b: int, r: int) -> str:
    """The check of the claim a op b = r: the inverse operation for + and - (r-b or r+b, which
    should give a), the recomputation for *; then the verdict."""
    x, cop, y, expect = (r, "-", b, a) if op == "+" else (r, "+", b, a) if op == "-" else \
        (a, "*", b, r)
    text, got = operation_solution(x, cop, y)
    return f" check {text} {'ok' if got == expect else 'no'}"


def reflective_solution(ops: list, form: str, rng: random.Random) -> tuple:
    """The worked solution of ops with one reflection in one operation (chosen at random):
    retry: one column written wrong, then " wait " and the column redone right;
    verify: the operation's result checked ("ok"); half the time one of its columns is written
    wrong first, so its result is wrong, the check says "no", and " wait " redoes the operation.
    -> (text, errors): errors the (start, end) character spans of the planted wrong values (the
    pretraining can show them without teaching them: nanor1.pretrain_documents)."""
    ops = resolve(ops)
    k = rng.randrange(len(ops))
    a, op, b = ops[k]
    steps, result = column_steps(a, op, b)
    values = [int(s.rsplit("=", 1)[1]) for s in steps]
    plain = f"{a}{op}{b}:{','.join(steps)}>{result}"
    i = rng.randrange(len(steps))
    if form == "retry":
        bad, _ = _wrong_column(steps[i], op, rng)
        steps = steps[:i] + [f"{bad} wait {steps[i]}"] + steps[i + 1:]
        text = f"{a}{op}{b}:{','.join(steps)}>{result}"
    elif form == "verify" and rng.random() < 0.5:
        bad, v = _wrong_column(steps[i], op, rng)
        wrong = _written_result(op, values[:i] + [v] + values[i + 1:])
        if op == "+" and wrong < b:     # the check r-b needs r >= b: check the right one instead
            text = plain + _check(a, op, b, result)
        else:
            text = (f"{a}{op}{b}:{','.join(steps[:i] + [bad] + steps[i + 1:])}>{wrong}"
                    + _check(a, op, b, wrong) + " wait " + plain)
    elif form == "verify":
        text = plain + _check(a, op, b, result)
    else:
        raise ValueError(f"unknown reflection form {form!r}; forms are verify, retry")
    parts = [operation_solution(*o)[0] for o in ops]
    text, errors = " ".join(parts[:k] + [text] + parts[k + 1:]), []
    while _ERR in text:
        start = text.index(_ERR)
        end = text.index(_END) - 1
        text = text.replace(_ERR, "", 1).replace(_END, "", 1)
        errors.append((start, end))
    return text, errors


def make_problem(level: str, rng: random.Random) -> Problem:
    """One random problem of a level (held-out or not; see training_problems/test_set)."""
    r = rng.randint
    while True:
        if level in ("add2", "add3"):
            lo, hi = (10, 99) if level == "add2" else (100, 999)
            a, b, op = r(lo, hi), r(lo, hi), rng.choice("+-")
            if op == "-" and a < b:
                a, b = b, a
            text, ops = f"{a}{op}{b}", [(a, op, b)]
        elif level == "mul":
            a, b = r(10, 999), r(2, 9)
            text, ops = f"{a}*{b}", [(a, "*", b)]
        elif level == "multi":
            a, b, c, d = r(10, 99), r(10, 99), r(2, 9), r(10, 99)
            op1, op3 = rng.choice("+-"), rng.choice("+-")
            if op1 == "-" and a < b:
                a, b = b, a
            inner = a + b if op1 == "+" else a - b
            if op3 == "-" and inner * c < d:
                continue  # keep every intermediate and the answer non-negative
            text, ops = f"({a}{op1}{b})*{c}{op3}{d}", [(a, op1, b), (None, "*", c), (None, op3, d)]
        elif level == EDGE_LEVEL:
            a, b = r(10, 99), r(10, 99)
            text, ops = f"{a}*{b}", mul2_ops(a, b)
        else:
            raise ValueError(f"unknown level {level!r}; levels are {', '.join(ALL_LEVELS)}")
        ops = resolve(ops)
        solution, answer = worked_solution(ops)
        return Problem(level, text, answer, solution, tuple(ops))


def training_problems(rng: random.Random, levels=LEVELS, weights=None):
    """Endless stream of training problems, held-out problems skipped; levels drawn uniformly, or in
    proportion to weights (one per level)."""
    while True:
        level = rng.choice(levels) if weights is None else rng.choices(levels, weights)[0]
        p = make_problem(level, rng)
        if not is_heldout(p.text):
            yield p


def only_training(problems: list, what: str):
    """ValueError if any of problems is held out: what makes training data of them, which must not
    leak the test set."""
    held = [p.text for p in problems if is_heldout(p.text)]
    if held:
        raise ValueError(f"{what} is for training problems; held out: {', '.join(held[:3])}")


def worked_solutions(n: int, seed) -> list:
    """Cold-start data (the R1 recipe): n training problems with their worked solutions, written
    exactly as the pretraining corpus writes them, as {level, problem, answer, prompt, completion}
    records."""
    problems = training_problems(random.Random(f"{seed}-cold-start"))
    return [p.record(p.document(think=True).removeprefix(p.prompt))
            for p in (next(problems) for _ in range(n))]


def subset(tests: dict, n: int) -> dict:
    """The first n problems of each level of a test set."""
    return {lvl: ps[:n] for lvl, ps in tests.items()}


def test_set(n_per_level: int, seed: int = 0, levels=LEVELS) -> dict:
    """The fixed held-out set: {level: [Problem]}, distinct problems, all from the held-out bucket."""
    rng, out = random.Random(f"nanor1-test-{seed}"), {}
    for level in levels:
        seen, probs = set(), []
        for _ in range(200 * n_per_level + 10_000):
            p = make_problem(level, rng)
            if is_heldout(p.text) and p.text not in seen:
                seen.add(p.text)
                probs.append(p)
                if len(probs) == n_per_level:
                    break
        if len(probs) < n_per_level:
            raise ValueError(f"test_set: level {level} has only {len(probs)} distinct held-out problems, "
                             f"{n_per_level} were asked for")
        out[level] = probs
    return out


# -----------------------------------------------------------------------------
# Problems typed by a person: untrusted text, parsed by recursive descent, never evaluated.
#   expr := term (('+' | '-') term)*   term := factor ('*' factor)*   factor := INT | '(' expr ')'

MAX_PROBLEM_CHARS = 1000   # far more than any context holds; keeps every number printable
MAX_NESTING = 50           # parentheses within parentheses (the parser recurses on each)
# each level's shape as make_problem writes it: its numbers' digits, without leading zeros
_D2, _D3 = "([1-9][0-9])", "([1-9][0-9]{2})"
SHAPES = {"add2": f"{_D2}([+-]){_D2}", "add3": f"{_D3}([+-]){_D3}",
          "mul": r"([1-9][0-9]{1,2})(\*)([2-9])",
          "multi": rf"\({_D2}([+-]){_D2}\)(\*)([2-9])([+-]){_D2}", "mul2": rf"{_D2}(\*){_D2}"}


def parse_problem(text: str) -> Problem:
    """A problem as a person types it ("(47+85)*3-29", spaces and a final "=" allowed) ->
    Problem: its value computed by the parser below, its level the one whose shape it has, with
    every intermediate result >= 0 (as make_problem makes them), else OUTSIDE (more digits,
    other shapes, a negative answer: no worked solution then). ValueError: not such a problem."""
    if re.search(r"[0-9]\s+[0-9]", text):
        raise ValueError("a space between two digits: one number or two?")
    text = "".join(text.split()).removesuffix("=")
    if not text:
        raise ValueError("empty: expected a problem such as (47+85)*3-29")
    if len(text) > MAX_PROBLEM_CHARS:
        raise ValueError(f"{len(text)} characters, more than {MAX_PROBLEM_CHARS}")
    answer = _parse_expression(text)
    for level, shape in SHAPES.items():
        m = re.fullmatch(shape, text)
        if m:
            n = [int(g) if g[0] in "0123456789" else g for g in m.groups()]
            ops = mul2_ops(n[0], n[2]) if level == EDGE_LEVEL else \
                [tuple(n[:3])] + [(None, n[i], n[i + 1]) for i in range(3, len(n), 2)]
            try:   # a subtraction below zero raises: that is not a problem of the level
                solution, result = worked_solution(ops)
            except ValueError:
                break
            assert result == answer, (text, result, answer)   # two ways to the same value
            return Problem(level, text, answer, solution, tuple(resolve(ops)))
    return Problem(OUTSIDE, text, answer, "")


def digits_end(text: str, pos: int) -> int:
    """Where the run of ASCII digits at text[pos:] ends ("٣" or "³" is not a digit here): the one
    number scanner of both parsers, this one and data/reflect.py's."""
    while pos < len(text) and text[pos] in "0123456789":
        pos += 1
    return pos


def _parse_expression(text: str) -> int:
    """The value of text (no spaces) under the grammar above, or ValueError saying where not."""
    pos = 0

    def fail(what):
        found = f"{text[pos]!r} at character {pos + 1}" if pos < len(text) else "the end"
        raise ValueError(f"expected {what}, found {found}")

    def factor(depth):
        nonlocal pos
        if text.startswith("(", pos):
            if depth >= MAX_NESTING:
                raise ValueError(f"parentheses nested more than {MAX_NESTING} deep")
            pos += 1
            value = expr(depth + 1)
            if not text.startswith(")", pos):
                fail("+, -, * or )")
            pos += 1
            return value
        start, pos = pos, digits_end(text, pos)
        if pos == start:
            fail("a number or (")
        return int(text[start:pos])

    def term(depth):
        nonlocal pos
        value = factor(depth)
        while text.startswith("*", pos):
            pos += 1
            value *= factor(depth)
        return value

    def expr(depth):
        nonlocal pos
        value = term(depth)
        while pos < len(text) and text[pos] in "+-":
            op, pos = text[pos], pos + 1
            value = value + term(depth) if op == "+" else value - term(depth)
        return value

    value = expr(0)
    if pos < len(text):
        fail("+, -, * or the end")
    return value
