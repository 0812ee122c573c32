"""Reflection counts (data/reflect.py): hand-counted completions, retries and checks judged against
their headers, no credit for malformed traces, rates with empty denominators, and no eval."""
import ast
import os
import time

import pytest
from hypothesis import given, settings, strategies as st

from data.reflect import (COUNT_FIELDS, MAX_REDOS, RATE_FIELDS, Op, add_counts,
                          completion_counts, counts_vector, parse_trace, reflection_rates)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def T(trace, answer="1"):
    """A thinking completion around a trace."""
    return f"<think>{trace}</think><answer>{answer}</answer>"


ADD = "347+285:7+5=12,4+8+1=13,3+2+1=6>632"              # 4 right claims: 3 columns, 1 result
ADD_BAD = "347+285:7+5=12,4+8+1=14,3+2+1=6>642"          # column 2 and the result wrong
CHECK = " check 632-285:12-5=7,13-8-1=4,6-2-1=3>347"     # 632-285 done right: 4 right claims
CHECK_BAD = " check 642-285:12-5=7,14-8-1=5,6-2-1=3>357"  # 642-285 done right: 4 right claims
MULTI = "47+85:7+5=12,4+8+1=13>132 132*3:2*3=6,3*3=9,1*3=3>396 396-29:16-9=7,9-2-1=6,3-0=3>367"
LINK = "1+1:1+1=2>2 check 2-1:2-1=1>1 no wait "          # 2 + 2 right claims, "no" on a right R
HUGE = "9" * 5000

# Hand-counted; n is 1 in every row.
#   th: thinking pa: parsed re: reflective kw: keyword  R/W: right/wrong claims
#   rf/wf: right/wrong flagged  fl: flagged  fx: fixed  ch: checks  vr: verdict right
CASES = [
    # th pa re kw   R  W rf wf fl fx ch vr
    ((1, 1, 0, 0,  4, 0, 0, 0, 0, 0, 0, 0), T(ADD)),                         # plain, all right
    ((1, 1, 0, 0,  4, 0, 0, 0, 0, 0, 0, 0), T("702-158:12-8=4,10-5-1=4,7-1-1=5>544")),
    ((1, 1, 0, 0,  4, 0, 0, 0, 0, 0, 0, 0), T("347*6:7*6=42,4*6+4=28,3*6+2=20>2082")),
    ((1, 1, 0, 0, 11, 0, 0, 0, 0, 0, 0, 0), T(MULTI)),                       # 3 + 4 + 4
    ((1, 1, 0, 0,  3, 1, 0, 0, 0, 0, 0, 0), T("347+285:7+5=12,4+8+1=14,3+2+1=6>632")),  # 1 col
    ((1, 1, 0, 0,  2, 2, 0, 0, 0, 0, 0, 0), T(ADD_BAD)),                     # a column, R
    ((1, 1, 0, 0,  3, 1, 0, 0, 0, 0, 0, 0), T("47+85:7+5=12,4+8+1=13,0+0+1=1>132")),  # col 3 extra
    ((1, 1, 0, 0,  2, 0, 0, 0, 0, 0, 0, 0), T("347+285:7+5=12>632")),        # columns missing
    ((1, 1, 0, 0,  3, 1, 0, 0, 0, 0, 0, 0), T("347+285:07+5=12,4+8+1=13,3+2+1=6>632")),  # "07"
    ((1, 1, 0, 0,  4, 0, 0, 0, 0, 0, 0, 0), T("347+285:7+5=12,4+8+1=13,3+2+1=6>0632")),  # =632
    # retries
    ((1, 1, 1, 1,  4, 1, 0, 1, 1, 1, 0, 0), T("347+285:7+5=12,4+8+1=14 wait 4+8+1=13,3+2+1=6>632")),
    ((1, 1, 1, 1,  3, 2, 0, 1, 1, 0, 0, 0), T("347+285:7+5=12,4+8+1=14 wait 4+8+1=15,3+2+1=6>632")),
    ((1, 1, 1, 1,  5, 0, 1, 0, 1, 1, 0, 0), T("347+285:7+5=12 wait 7+5=12,4+8+1=13,3+2+1=6>632")),
    # 14 wait 15 (not fixed) wait 13 (fixed)
    ((1, 1, 1, 1,  4, 2, 0, 2, 2, 1, 0, 0),
     T("347+285:7+5=12,4+8+1=14 wait 4+8+1=15 wait 4+8+1=13,3+2+1=6>632")),
    # the redo of column 2 is column 3's text: wrong at position 2
    ((1, 1, 1, 1,  2, 2, 0, 1, 1, 0, 0, 0), T("347+285:7+5=12,4+8+1=14 wait 3+2+1=6>632")),
    # a retry inside a check: 13-8-1=5 wait 13-8-1=4
    ((1, 1, 1, 1,  8, 1, 0, 1, 1, 1, 1, 1),
     T(ADD + " check 632-285:12-5=7,13-8-1=5 wait 13-8-1=4,6-2-1=3>347 ok")),
    # checks
    ((1, 1, 1, 1,  8, 0, 0, 0, 0, 0, 1, 1), T(ADD + CHECK + " ok")),         # ok on a right R
    ((1, 1, 1, 1,  6, 2, 0, 0, 0, 0, 1, 0), T(ADD_BAD + CHECK_BAD + " ok")),  # ok on a wrong R
    ((1, 1, 1, 1, 10, 2, 0, 1, 1, 1, 1, 1), T(ADD_BAD + CHECK_BAD + " no wait " + ADD)),  # fixed
    ((1, 1, 1, 1,  8, 4, 0, 1, 1, 0, 1, 1), T(ADD_BAD + CHECK_BAD + " no wait " + ADD_BAD)),
    ((1, 1, 1, 1, 12, 0, 1, 0, 1, 1, 1, 0), T(ADD + CHECK + " no wait " + ADD)),  # no on right R
    # the check's own arithmetic wrong (13-8-1=5, >357), its verdict on R right
    ((1, 1, 1, 1,  6, 2, 0, 0, 0, 0, 1, 1),
     T(ADD + " check 632-285:12-5=7,13-8-1=5,6-2-1=3>357 ok")),
    # the redo changes the header: right for 347+284, not a fix of 347+285
    ((1, 1, 1, 1, 10, 2, 0, 1, 1, 0, 1, 1),
     T(ADD_BAD + CHECK_BAD + " no wait 347+284:7+4=11,4+8+1=13,3+2+1=6>631")),
    # the redo carries its own check
    ((1, 1, 1, 1, 14, 2, 0, 1, 1, 1, 2, 2),
     T(ADD_BAD + CHECK_BAD + " no wait " + ADD + CHECK + " ok")),
    ((1, 1, 1, 1,  8, 0, 0, 0, 0, 0, 1, 1),                                  # a check of a*b is a*b
     T("347*6:7*6=42,4*6+4=28,3*6+2=20>2082 check 347*6:7*6=42,4*6+4=28,3*6+2=20>2082 ok")),
    ((1, 1, 1, 1, 14, 0, 3, 0, 3, 3, 3, 0), T(LINK * 3 + "1+1:1+1=2>2")),    # 3 nested false alarms
    # unjudgeable headers: grammatical, so parsed, but no claims; their check and redo count alone
    ((1, 1, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T("3-8:3-8=5>5")),
    ((1, 1, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T("12*34:2*4=8>408")),
    ((1, 1, 1, 1,  4, 0, 0, 0, 0, 0, 0, 0),
     T("3-8:13-8=5>5 check 5+8:5+8=13>13 no wait 8-3:8-3=5>5")),
    # multi-step, a check on the middle op
    ((1, 1, 1, 1, 15, 0, 0, 0, 0, 0, 1, 1), T(MULTI.replace(">396 ", ">396 check 132*3:2*3=6,"
                                                            "3*3=9,1*3=3>396 ok "))),
    # ... the middle op wrong (1*3=4, >496), caught, redone, and the chain goes on
    ((1, 1, 1, 1, 17, 2, 0, 1, 1, 1, 1, 1),
     T("47+85:7+5=12,4+8+1=13>132 132*3:2*3=6,3*3=9,1*3=4>496 check 132*3:2*3=6,3*3=9,1*3=3>396"
       " no wait 132*3:2*3=6,3*3=9,1*3=3>396 396-29:16-9=7,9-2-1=6,3-0=3>367")),
    # not thinking; keywords anywhere, as whole words, any case
    ((0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "<answer>5</answer>"),
    ((0, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), "<answer>5</answer> but wait"),
    ((0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "Waiting... checked, rewait <answer>5</answer>"),
    ((0, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), "CHECK: <answer>5</answer>"),
    ((0, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), " " + T(ADD + CHECK + " ok")),  # not at the start
    ((1, 1, 0, 1,  4, 0, 0, 0, 0, 0, 0, 0), T(ADD, answer="5 (a mistake?)")),
    # malformed or adversarial: no credit, thinking still counted
    ((0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), ""),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "<think></think>"),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "<think></think><answer>5</answer>"),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "<think>" + ADD),                # unclosed
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T("wait wait wait")),
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + CHECK)),                 # no verdict
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + CHECK + " okay")),
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + CHECK + " no wait ")),  # no redo
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + CHECK + " no " + ADD)),  # no "wait"
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + " x")),                  # trailing garbage
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + " ")),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T(" " + ADD)),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + "  " + ADD)),           # two spaces
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD + " wait 632")),           # wait after a result
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T("347+285:>632")),              # no columns
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T("٣+4:٣+4=7>7")),               # Arabic-Indic digit
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T(ADD.replace(">632", ">٦٣٢"))),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T(HUGE + "+1:9+1=10>1" + "0" * 5000, HUGE)),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T("1" * 200 + "+0:1+0=1>" + "1" * 200)),  # > 100 digits
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), T("1+1:1+1=2>2 " * 9000 + "1+1:1+1=2>2")),  # 108k
    ((1, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 0), T(LINK * (MAX_REDOS + 10) + "1+1:1+1=2>2")),  # too deep
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "<think><think>" + ADD + "</think></think>"),
    ((1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0), "<think>" + ADD + "<think></think>"),
    ((1, 1, 0, 0,  4, 0, 0, 0, 0, 0, 0, 0), "<think>" + ADD + "</think></think>x"),  # after: not
]                                                                                  # the trace


@pytest.mark.parametrize("expected,completion", CASES, ids=lambda x: repr(x)[:60])
def test_completion_counts(expected, completion):
    got = completion_counts(completion)
    assert list(got) == list(COUNT_FIELDS) and all(type(v) is int for v in got.values())
    assert got["n"] == 1
    assert tuple(got[f] for f in COUNT_FIELDS[1:]) == expected


def test_parse_trace_keeps_each_redo_at_its_columns_position():
    ops = parse_trace("347+285:7+5=12,4+8+1=14 wait 4+8+1=13,3+2+1=6>632 3-2:3-2=1>1")
    steps = [["7+5=12"], ["4+8+1=14", "4+8+1=13"], ["3+2+1=6"]]
    assert ops == [Op(347, "+", 285, steps, 632, None), Op(3, "-", 2, [["3-2=1"]], 1, None)]


def test_bounds_raise_value_error_and_stay_fast():
    t = time.perf_counter()
    for trace in [LINK * 1000 + ADD, LINK * (MAX_REDOS + 1) + ADD, "1" * 101 + "+1:1+1=2>2"]:
        with pytest.raises(ValueError):   # not a RecursionError, not int()'s digit limit
            parse_trace(trace)
    parse_trace(LINK * MAX_REDOS + ADD)                     # as deep as allowed: fine
    completion_counts("<think>" + "9" * 100_000 + "</think>" + "wait" * 100_000)
    assert time.perf_counter() - t < 2.0


def test_rates_and_their_empty_denominators():
    counts = dict(n=10, thinking=8, parsed=6, reflective=2, keyword=5, right=40, wrong=10,
                  right_flagged=2, wrong_flagged=5, flagged=7, fixed=6, checks=4, verdict_right=3)
    assert reflection_rates(counts) == dict(reflect_rate=0.25, catch_rate=0.5,
                                            false_alarm_rate=0.05, fix_rate=6 / 7,
                                            verdict_acc=0.75, keyword_rate=0.5)
    assert list(reflection_rates(counts)) == list(RATE_FIELDS)
    assert reflection_rates(dict.fromkeys(COUNT_FIELDS, 0)) == dict.fromkeys(RATE_FIELDS, None)
    no_checks = dict(counts, checks=0, verdict_right=0, wrong=0, wrong_flagged=0)
    assert reflection_rates(no_checks)["verdict_acc"] is None
    assert reflection_rates(no_checks)["catch_rate"] is None
    assert reflection_rates(no_checks)["fix_rate"] == 6 / 7


def test_counts_add_up_over_completions():
    texts = [T(ADD), T("347+285:7+5=12,4+8+1=14 wait 4+8+1=13,3+2+1=6>632"),
             T(ADD_BAD + CHECK_BAD + " no wait " + ADD), "<answer>5</answer> wait", "<think>x"]
    total = {}
    for text in texts:
        total = add_counts(total, completion_counts(text))
        assert counts_vector(text) == [completion_counts(text)[f] for f in COUNT_FIELDS]
    # hand sum of the rows above: 4; 4+1 wrong, flagged, fixed; 10+2, flagged, fixed, checked
    assert total == dict(n=5, thinking=4, parsed=3, reflective=2, keyword=3, right=18, wrong=3,
                         right_flagged=0, wrong_flagged=2, flagged=2, fixed=2, checks=1,
                         verdict_right=1)
    rates = reflection_rates(total)
    assert rates["reflect_rate"] == 0.5 and rates["catch_rate"] == 2 / 3
    assert rates["false_alarm_rate"] == 0.0 and rates["fix_rate"] == 1.0
    assert rates["verdict_acc"] == 1.0 and rates["keyword_rate"] == 0.6


PIECES = ["<think>", "</think>", ADD, ADD_BAD, CHECK, CHECK_BAD, "3-8:3-8=5>5", "1+1:1+1=2>2",
          " ", " check ", " wait ", "no wait ", "ok", "no", ",", ">", "7+5=12", "4+8+1=14", "9"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join) | st.text(max_size=200))
def test_invariants_on_any_text(text):
    for c in completion_counts(text), completion_counts(f"<think>{text}</think>"):
        check_invariants(c)


def check_invariants(c):
    assert all(type(v) is int and v >= 0 for v in c.values())
    assert c["n"] == 1 and c["keyword"] <= 1
    assert c["reflective"] <= c["parsed"] <= c["thinking"] <= 1
    assert c["flagged"] == c["right_flagged"] + c["wrong_flagged"]
    assert c["wrong_flagged"] <= c["wrong"] and c["right_flagged"] <= c["right"]
    assert c["fixed"] <= c["flagged"]            # fixed counts flagged claims whose redo is right
    assert c["verdict_right"] <= c["checks"]
    if not c["parsed"]:
        assert not any(c[f] for f in COUNT_FIELDS[5:])


def test_no_eval_exec_or_compile():
    src = open(os.path.join(ROOT, "data", "reflect.py"), encoding="utf-8").read()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "compile", "__import__"), node.func.id
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in ("eval", "exec"), node.func.attr   # re.compile is fine
        assert not (isinstance(node, ast.Name) and node.id in ("builtins", "__builtins__"))
