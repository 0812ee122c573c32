"""
Reflection in worked solutions, counted exactly: does the model catch its own mistakes?

DeepSeek-R1-Zero learned to write "wait" and re-check its work. In nanor1 a minority of
pretraining documents show two ways of doing so, written in the worked-solution format of
data/arith.py:

    retry         a column written, " wait ", the same column redone
                  347+285:7+5=12,4+8+1=14 wait 4+8+1=13,3+2+1=6>632
    verification  an operation's result R checked by another column operation, then "ok", or
                  "no wait " and the whole operation redone (the redo may carry its own check)
                  347+285:7+5=12,4+8+1=13,3+2+1=6>632 check 632-285:12-5=7,13-8-1=4,6-2-1=3>347 ok

(the check of a+b=R is R-b, of a-b=R is R+b, both should give a; of a*b=R it is a*b again).
A trace, the text between <think> and the first </think>, is read by recursive descent under

    solution := op (" " op)*
    op       := NUM SYM NUM ":" steps ">" NUM [check]
    check    := " check " NUM SYM NUM ":" steps ">" NUM " " ("ok" | "no wait " op)
    steps    := step ("," step)*
    step     := column (" wait " column)*
    column   := NUM SYM NUM [("+" | "-") NUM] "=" NUM         NUM: ASCII digits, SYM: + - *

and judged, never trusted. Each header a SYM b (of an op, a check or a redo) is judged on its own,
by the operands as written there, and only if data.arith.column_steps can do it (a-b needs
a >= b, a*b a one-digit b); claims under a header it cannot do are not counted.

    claim    every column written and every result R. A column is right iff its text is the
             correct column at its position (a redo after " wait " takes the position of the column
             it redoes); a result iff its value is a SYM b.
    flagged  a column followed by " wait ", and a result whose check says "no". Its redo is the
             next column, or the result of the op after "no wait " (judged against the ORIGINAL
             header). fixed: a flagged claim whose redo is right.
    checks   checks of a judgeable op; a verdict is right iff ("ok") == (R is right), whatever
             the check's own arithmetic says.

A trace that does not parse in full earns nothing (no claims, flags, checks, not reflective): a
model cannot get credit for malformed text. `keyword` counts, in any completion, the words that
DeepSeek-R1's analysis counted as reflective (Nature 2025, extended data), for comparison.
"""
import re
from typing import NamedTuple

from .arith import column_steps, digits_end

COUNT_FIELDS = ("n", "thinking", "parsed", "reflective", "keyword", "right", "wrong",
                "right_flagged", "wrong_flagged", "flagged", "fixed", "checks", "verdict_right")
RATE_FIELDS = ("reflect_rate", "catch_rate", "false_alarm_rate", "fix_rate", "verdict_acc",
               "keyword_rate")
# each rate as (numerator, denominator) counts
RATES = {"reflect_rate": ("reflective", "thinking"), "catch_rate": ("wrong_flagged", "wrong"),
         "false_alarm_rate": ("right_flagged", "right"), "fix_rate": ("fixed", "flagged"),
         "verdict_acc": ("verdict_right", "checks"), "keyword_rate": ("keyword", "n")}
KEYWORDS = re.compile(r"\b(wait|mistake|however|but|retry|error|verify|wrong|evaluate|check)\b",
                      re.IGNORECASE)

MAX_TRACE_CHARS = 4096   # 8x the longest context nanor1 runs (512 tokens, 1 char = 1 token)
MAX_DIGITS = 100         # per number: far more than any problem needs, far under int()'s limit
MAX_REDOS = 50           # "no wait" ops nested in one another (the parser recurses on each)


class Op(NamedTuple):
    a: int
    sym: str
    b: int
    steps: list       # one list per column position: the column, then each redo after " wait "
    result: int
    check: "Check"    # or None


class Check(NamedTuple):
    work: Op          # the check's own column operation (it has no check itself)
    verdict: str      # "ok" or "no"
    redo: Op          # the op after "no wait ", None after "ok"


def parse_trace(trace: str) -> list:
    """The ops of a trace under the grammar above, or ValueError saying where not."""
    if len(trace) > MAX_TRACE_CHARS:
        raise ValueError(f"{len(trace)} characters, more than {MAX_TRACE_CHARS}")
    pos = 0

    def fail(what):
        found = f"{trace[pos]!r} at character {pos + 1}" if pos < len(trace) else "the end"
        raise ValueError(f"expected {what}, found {found}")

    def take(literal):   # consume literal if it comes next
        nonlocal pos
        if trace.startswith(literal, pos):
            pos += len(literal)
            return True
        return False

    def expect(literal, what=None):
        if not take(literal):
            fail(what or repr(literal))

    def number():
        nonlocal pos
        start, pos = pos, digits_end(trace, pos)
        if pos == start:
            fail("a number")
        if pos - start > MAX_DIGITS:
            raise ValueError(f"a number of {pos - start} digits, more than {MAX_DIGITS}")
        return int(trace[start:pos])

    def sym(allowed):
        nonlocal pos
        if pos >= len(trace) or trace[pos] not in allowed:
            fail(" or ".join(allowed))
        pos += 1
        return trace[pos - 1]

    def column():
        start = pos
        number()
        sym("+-*")
        number()
        if pos < len(trace) and trace[pos] in "+-":   # a carry or a borrow
            sym("+-")
            number()
        expect("=")
        number()
        return trace[start:pos]

    def work():   # NUM SYM NUM ":" steps ">" NUM
        a, s, b = number(), sym("+-*"), number()
        expect(":")
        steps = []
        while True:
            tries = [column()]
            while take(" wait "):
                tries.append(column())
            steps.append(tries)
            if not take(","):
                break
        expect(">", '",", " wait " or ">"')
        return Op(a, s, b, steps, number(), None)

    def op(depth):
        done = work()
        if not take(" check "):
            return done
        checked = work()
        expect(" ", "a space and a verdict")
        if take("ok"):
            return done._replace(check=Check(checked, "ok", None))
        expect("no wait ", '"ok" or "no wait "')
        if depth >= MAX_REDOS:
            raise ValueError(f"more than {MAX_REDOS} redos nested")
        return done._replace(check=Check(checked, "no", op(depth + 1)))

    ops = [op(0)]
    while take(" "):
        ops.append(op(0))
    if pos < len(trace):
        fail('" ", " check " or the end')
    return ops


def _true_value(a: int, s: str, b: int):
    """(correct columns, value) of a header, or None if column arithmetic cannot do it."""
    try:
        return column_steps(a, s, b)
    except ValueError:
        return None


def _count_work(o: Op, c: dict):
    """Count the columns and result of o against its header -> its value, None if unjudgeable."""
    judged = _true_value(o.a, o.sym, o.b)
    if judged is None:
        return None
    correct, value = judged
    for i, tries in enumerate(o.steps):
        ok = [i < len(correct) and t == correct[i] for t in tries]
        c["right"] += sum(ok)
        c["wrong"] += len(ok) - sum(ok)
        for flagged_ok, redo_ok in zip(ok, ok[1:]):   # every try but the last is followed by wait
            c["right_flagged" if flagged_ok else "wrong_flagged"] += 1
            c["fixed"] += redo_ok
    c["right" if o.result == value else "wrong"] += 1
    return value


def _count_op(o: Op, c: dict):
    value = _count_work(o, c)
    if o.check is None:
        return
    _count_work(o.check.work, c)   # a check's result is a claim, never flagged
    if value is not None:
        c["checks"] += 1
        c["verdict_right"] += (o.check.verdict == "ok") == (o.result == value)
        if o.check.verdict == "no":
            c["right_flagged" if o.result == value else "wrong_flagged"] += 1
            c["fixed"] += o.check.redo.result == value
    if o.check.redo is not None:
        _count_op(o.check.redo, c)   # judged as an op in its own right, too


def completion_counts(text: str) -> dict:
    """One completion -> {field: int} for every field of COUNT_FIELDS (n = 1)."""
    c = dict.fromkeys(COUNT_FIELDS, 0)
    c["n"] = 1
    c["keyword"] = int(KEYWORDS.search(text) is not None)
    c["thinking"] = int(text.startswith("<think>"))   # as the evaluation's think rate counts
    end = text.find("</think>")
    if not c["thinking"] or end < 0:
        return c
    trace = text[len("<think>"):end]
    try:
        ops = parse_trace(trace)
    except ValueError:
        return c
    c["parsed"] = 1
    # in a trace that parsed, " check " and " wait " appear only as the grammar's
    c["reflective"] = int(" check " in trace or " wait " in trace)
    for o in ops:
        _count_op(o, c)
    c["flagged"] = c["right_flagged"] + c["wrong_flagged"]
    return c


def counts_vector(text: str) -> list:
    """completion_counts as a list in COUNT_FIELDS order, to sum in a tensor across ranks."""
    c = completion_counts(text)
    return [c[f] for f in COUNT_FIELDS]


def add_counts(total: dict, counts: dict) -> dict:
    """total + counts, field by field (total may be {})."""
    return {f: total.get(f, 0) + counts[f] for f in COUNT_FIELDS}


def reflection_rates(counts: dict) -> dict:
    """{rate: numerator / denominator} for RATE_FIELDS, None where the denominator is 0."""
    return {r: counts[num] / counts[den] if counts[den] else None
            for r, (num, den) in RATES.items()}
