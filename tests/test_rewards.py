"""R1-Zero rewards: parse, never evaluate. Table-driven checks of parse_answer, accuracy_reward and
format_reward on adversarial completions (model output is untrusted text)."""
import ast
import glob
import io
import os
import re
import tokenize

import pytest

from nanor1 import accuracy_reward, format_reward, parse_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = "9" * 5000

# (completion, what parse_answer must return)
PARSE_CASES = [
    ("", None),                                                   # empty
    ("   \n\t ", None),                                           # only whitespace
    ("42", None),                                                 # no tags at all
    ("the answer is 42", None),
    ("<answer>42</answer>", 42),
    ("<think>7+5=12</think><answer>132</answer>", 132),
    ("<answer> 42 </answer>", 42),                                # whitespace around the number
    ("<answer>\n42\n\t</answer>", 42),
    ("<answer>4 2</answer>", None),                               # whitespace inside the number
    # only ASCII space, tab, CR and LF may pad the number (guards against str.strip(), which also
    # removes NBSP, U+3000, form feed, vertical tab, U+2028 ...), and no plus sign (guards against
    # an optional "+" in _INT: int() accepts "+42", as it accepts " 42\u00a0")
    ("<answer> \t\r\n42\r\n\t </answer>", 42),
    ("<answer>\u00a042</answer>", None),                          # NBSP: str.strip() would remove it
    ("<answer>42\u00a0</answer>", None),
    ("<answer>\u300042\u3000</answer>", None),                    # ideographic space
    ("<answer>\f42</answer>", None),                              # form feed
    ("<answer>42\v</answer>", None),                              # vertical tab
    ("<answer>\u202842</answer>", None),                          # line separator
    ("<answer>42\u2029</answer>", None),                          # paragraph separator
    ("<answer>\x8542</answer>", None),                            # NEL
    ("<answer>\u200342</answer>", None),                          # em space
    ("<answer>\x1c42</answer>", None),                            # file separator: isspace() in Python
    ("<answer>+42</answer>", None),                               # an explicit plus sign: int() would accept
    ("<answer> +42 </answer>", None),
    ("<answer>+0</answer>", None),
    ("<answer>-+4</answer>", None),
    ("<answer>-17</answer>", -17),                                # negative
    ("<answer>-0</answer>", 0),
    ("<answer>007</answer>", 7),                                  # leading zeros: the integer 7
    ("<answer>000</answer>", 0),
    ("<answer></answer>", None),                                  # empty answer
    ("<answer>   </answer>", None),
    ("<answer>-</answer>", None),
    ("<answer>--5</answer>", None),
    ("<answer>1.0</answer>", None),
    ("<answer>1e3</answer>", None),
    ("<answer>0x1F</answer>", None),
    ("<answer>1_000</answer>", None),                             # int() would accept this
    ("<answer>12abc</answer>", None),
    ("<answer>٣</answer>", None),                                 # Arabic-Indic digit: int() would accept
    ("<answer>٤٢</answer>", None),
    ("<answer>4٢</answer>", None),
    ("<answer>³</answer>", None),                                 # superscript: int() raises
    ("<answer>４２</answer>", None),                              # fullwidth: int() would accept
    ("<answer>𝟒𝟐</answer>", None),                                # mathematical bold digits
    ("<answer><answer>5</answer></answer>", None),                # nested
    ("<answer>5</answer><answer>5</answer>", None),               # repeated
    ("<answer>5</answer><answer>6</answer>", None),
    ("<answer>5", None),                                          # missing close tag
    ("5</answer>", None),                                         # missing open tag
    ("</answer>5<answer>", None),                                 # tags in the wrong order
    ("<answer>5</answer> and then some text", 5),                 # text after </answer>: still the answer
    ("<answer>5</answer><think>because</think>", 5),              # answer before think
    ("<think></think><answer>5</answer>", 5),                     # empty think
    ("<think>so <answer>5</answer></think>", 5),                  # answer inside think
]


@pytest.mark.rewards
@pytest.mark.parametrize("completion,expected", PARSE_CASES)
def test_parse_answer(completion, expected):
    got = parse_answer(completion)
    assert got == expected
    if expected is not None:
        assert type(got) is int


@pytest.mark.rewards
def test_parse_answer_huge_number_does_not_raise():
    """parse_answer takes at most 4000 digits (_INT), under Python's 4300-digit int() limit: 4000
    digits are a number, 4001 or 5000 are None, never a ValueError from int(). Guards against a
    limit removed or raised past int()'s (a raise), or lowered (a long answer lost)."""
    assert parse_answer(f"<think>x</think><answer>{HUGE}</answer>") is None       # 5000 digits
    assert parse_answer(f"<answer>-{HUGE}</answer>") is None
    assert parse_answer(f"<answer>{'9' * 4001}</answer>") is None
    assert parse_answer(f"<answer>-{'9' * 4001}</answer>") is None
    assert parse_answer(f"<answer>{'9' * 4000}</answer>") == 10 ** 4000 - 1
    assert parse_answer(f"<answer>-{'9' * 4000}</answer>") == -(10 ** 4000 - 1)
    assert parse_answer(f"<answer>{'1' * 100}</answer>") == int("1" * 100)   # big but sane is fine


# (completion, true answer, accuracy reward)
ACCURACY_CASES = [
    ("<think>x</think><answer>42</answer>", 42, 1.0),
    ("<think>x</think><answer>42</answer>", 41, 0.0),
    ("<think>x</think><answer>42</answer>", 420, 0.0),
    ("<answer>42</answer>", 42, 1.0),                             # accuracy does not need the think part
    ("<answer> 42\n</answer>", 42, 1.0),
    ("<answer>4 2</answer>", 42, 0.0),
    ("<answer>-3</answer>", -3, 1.0),
    ("<answer>3</answer>", -3, 0.0),
    ("<answer>-3</answer>", 3, 0.0),
    ("<answer>007</answer>", 7, 1.0),
    ("", 0, 0.0),                                                 # nothing parsed is never "0"
    ("   ", 0, 0.0),
    ("<answer></answer>", 0, 0.0),
    ("<answer>x</answer>", 0, 0.0),
    ("0", 0, 0.0),
    ("42", 42, 0.0),
    ("<answer>٤٢</answer>", 42, 0.0),
    ("<answer>４２</answer>", 42, 0.0),
    ("<answer>³</answer>", 3, 0.0),
    ("<answer>1_000</answer>", 1000, 0.0),
    ("<answer>+42</answer>", 42, 0.0),                            # no plus sign
    ("<answer>\u00a042</answer>", 42, 0.0),                       # no non-ASCII whitespace
    ("<answer>42\u3000</answer>", 42, 0.0),
    ("<answer>42</answer><answer>42</answer>", 42, 0.0),          # repeated
    ("<answer><answer>42</answer></answer>", 42, 0.0),            # nested
    ("<answer>42", 42, 0.0),                                      # unclosed
    ("<answer>42</answer> trailing", 42, 1.0),
    ("<answer>42</answer><think>x</think>", 42, 1.0),
    ("<think>42</think>", 42, 0.0),                               # the number in the thoughts earns nothing
    (f"<answer>{HUGE}</answer>", 3, 0.0),
]


@pytest.mark.rewards
@pytest.mark.parametrize("completion,answer,expected", ACCURACY_CASES)
def test_accuracy_reward(completion, answer, expected):
    got = accuracy_reward(completion, answer)
    assert isinstance(got, float)
    assert got == expected


# (completion, format reward)
FORMAT_CASES = [
    ("<think>a</think><answer>5</answer>", 1.0),
    ("<think>7+5=12,4+8+1=13>132</think><answer>132</answer>", 1.0),
    ("  <think>a</think>\n<answer>5</answer>\n", 1.0),           # whitespace around the parts is fine
    ("<think>x\ny</think><answer>\n42\n</answer>", 1.0),          # multi-line
    ("", 0.0),
    ("   \n", 0.0),
    ("5", 0.0),
    ("<think></think><answer>5</answer>", 0.0),                   # empty think
    ("<think> \n </think><answer>5</answer>", 0.0),               # whitespace-only think
    ("<think>a</think><answer></answer>", 0.0),                   # empty answer
    ("<think>a</think><answer>  </answer>", 0.0),
    ("<answer>5</answer>", 0.0),                                  # no think
    ("<think>a</think>", 0.0),                                    # no answer
    ("<answer>5</answer><think>a</think>", 0.0),                  # answer before think
    ("<think>a</think><answer>5</answer>x", 0.0),                 # text after </answer>
    ("<think>a</think><answer>5</answer></answer>", 0.0),
    ("x<think>a</think><answer>5</answer>", 0.0),                 # text before <think>
    ("<think>a</think>x<answer>5</answer>", 0.0),                 # text between the parts
    ("<think>a<think>b</think></think><answer>5</answer>", 0.0),  # nested think
    ("<think>a</think><think>b</think><answer>5</answer>", 0.0),  # repeated think
    ("<think>a</think><answer>5</answer><answer>5</answer>", 0.0),  # repeated answer
    ("<think>a</think><answer><answer>5</answer></answer>", 0.0),   # nested answer
    ("<think>a<answer>5</answer></think>", 0.0),                  # answer inside think
    ("<think>a<answer>5</answer>", 0.0),                          # missing </think>
    ("<think>a</think><answer>5", 0.0),                           # missing </answer>
    ("think>a</think><answer>5</answer>", 0.0),                   # broken open tag
    ("<think>a</answer><answer>5</think>", 0.0),                  # closes swapped
    (f"<think>a</think><answer>{HUGE}</answer>" + "<", 0.0),
]


@pytest.mark.rewards
@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    got = format_reward(completion)
    assert isinstance(got, float)
    assert got == expected


@pytest.mark.rewards
def test_rewards_on_huge_inputs_do_not_raise_and_stay_fast():
    import time
    t = time.perf_counter()
    big = "<think>" + "1+1=2," * 20000 + "</think><answer>" + HUGE + "</answer>"
    assert format_reward(big) == 1.0
    assert accuracy_reward(big, 2) == 0.0
    assert format_reward("<think>" * 5000 + "</answer>" * 5000) == 0.0
    assert parse_answer("<answer>" * 5000) is None
    assert time.perf_counter() - t < 5.0


# -----------------------------------------------------------------------------
# Parse, never evaluate: no eval/exec anywhere in the code that touches model output

CALL_RE = re.compile(r"(?<![\w.])(eval|exec)\s*\(")   # eval( / exec( / builtins.eval( ...; not model.eval()
BUILTIN_RE = re.compile(r"builtins\s*\.\s*(eval|exec)\b|__builtins__|getattr\s*\([^)]*[\"'](eval|exec)[\"']")


BLANKED = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def code_only(src: str) -> str:
    """The source with comments and string literals blanked out in place (prose may say "eval (")."""
    lines = src.splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in BLANKED:
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                line = lines[r - 1]
                a, b = (c0 if r == r0 else 0), (c1 if r == r1 else len(line.rstrip("\n")))
                lines[r - 1] = line[:a] + " " * (b - a) + line[b:]
    return "".join(lines)


def source_files():
    files = [os.path.join(ROOT, "nanor1.py"), os.path.join(ROOT, "moe.py")]
    files += sorted(glob.glob(os.path.join(ROOT, "data", "**", "*.py"), recursive=True))
    assert all(os.path.exists(f) for f in files) and len(files) >= 3
    return files


@pytest.mark.parametrize("path", source_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_eval_or_exec_in_source(path):
    src = open(path, encoding="utf-8").read()
    code = code_only(src)
    assert "def parse_answer" in code or not path.endswith("nanor1.py")
    assert not CALL_RE.findall(code), f"{path} calls eval/exec"
    assert not BUILTIN_RE.findall(code), f"{path} reaches eval/exec through builtins"
    # and, structurally: no call whose target is the name eval/exec
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "compile", "__import__"), f"{path}: {node.func.id}()"


def test_the_eval_detector_catches_calls():
    assert CALL_RE.search("x = eval(text)")
    assert CALL_RE.search("exec (code)")
    assert not CALL_RE.search("model.eval()")
    assert not CALL_RE.search("ref.eval().requires_grad_(False)")
    assert CALL_RE.search(code_only("y = 1  # eval (\nz = eval(s)"))
    assert not CALL_RE.search(code_only("y = 1  # grpo/eval (default)\nz = 'exec(x)'"))
