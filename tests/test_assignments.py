"""The test suite as a classroom autograder (see tests/make_student.py and the README).

Every solution region `# BEGIN ASSIGNMENT <name>` ... `# END ASSIGNMENT` is graded by the tests
marked @pytest.mark.<name>. That is only true if the markers are exact: a test that needs an
assignment but lacks its marker fails for students working on something else; a marked test that
does not need the assignment grades nothing. So: write a student copy, run the suite there, and
check that exactly the marked tests fail. (That the reference passes them all is the ordinary run.)
"""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_student as ms  # noqa: E402

REQUIRED = {"rmsnorm_rope", "mla_absorb", "gate", "balance", "advantages", "grpo_loss", "rewards"}
BUILTIN_MARKERS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings",
                   "hypothesis"}  # hypothesis marks every @given test itself
# run in the copies: everything but this file (it would recurse) and the slow tests
COPY_ARGS = ["-q", "-m", "not slow", "--ignore=tests/test_assignments.py", "tests"]


def registered_markers() -> set:
    text = (ms.ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
        lines = tomllib.loads(text)["tool"]["pytest"]["ini_options"].get("markers", [])
    except ImportError:  # Python < 3.11: the markers list is simple enough for a regex
        block = re.search(r"(?ms)^markers\s*=\s*\[(.*?)^\]", text)
        lines = re.findall(r"""["']([^"']*)["']""", block.group(1)) if block else []
    return {line.split(":")[0].split("(")[0].strip() for line in lines}


@pytest.fixture(scope="module")
def source_assignments():
    return ms.assignments()


@pytest.fixture(scope="module")
def reference_markers(tmp_path_factory):
    res = ms.run_pytest(ms.ROOT, ["--collect-only", "-q"], tmp_path_factory.mktemp("collect") / "r.json")
    assert not res["collect_errors"], f"the reference suite does not collect: {res['collect_errors']}"
    return res["markers"]


def outcomes_in_copy(tmp_path_factory, only):
    out = tmp_path_factory.mktemp("student") / "copy"
    blanked = ms.make_student(out, only)
    res = ms.run_pytest(out, COPY_ARGS, out.parent / "record.json", timeout=1800)
    assert not res["collect_errors"], (
        "test modules fail to import on the student copy (module-level code calls an assignment? "
        f"move it into a fixture): {res['collect_errors']}")
    assert res["rc"] in (0, 1), f"pytest exited {res['rc']} in the student copy:\n{res['output'][-3000:]}"
    return blanked, res


def check_exact_failures(res, graded: set, what: str):
    """The tests that fail are exactly those marked with one of `graded`; every other test passes."""
    ran = {t: o for t, o in res["outcomes"].items() if o in ("passed", "failed", "xpassed")}
    marked = {t for t in ran if graded & set(res["markers"].get(t, ()))}
    failed = {t for t, o in ran.items() if o == "failed"}
    assert ran, f"no test ran in the student copy:\n{res['output'][-3000:]}"
    unmarked_failures = sorted(failed - marked)
    marked_passes = sorted(marked - failed)
    lines = [f"student copy with {what} blanked: {len(failed)} of {len(ran)} tests failed, "
             f"{len(marked)} carry a marker of {sorted(graded)}."]
    needs = [t for t in unmarked_failures if "NotImplementedError" in res["messages"].get(t, "")]
    other = [t for t in unmarked_failures if t not in needs]
    if needs:
        lines.append("raise a blanked assignment's NotImplementedError, but carry no marker of it (add the marker):")
        lines += [f"  {t}  -- {res['messages'][t][:160]}" for t in needs]
    if other:
        lines.append("fail otherwise: a missing marker seen through a subprocess, or a test that also fails "
                     "on the reference (run it there):")
        lines += [f"  {t}  -- {res['messages'].get(t, '')[:200]}" for t in other]
    if marked_passes:
        lines.append("marked, but pass with the assignment blanked (remove the marker):")
        lines += [f"  {t}  markers={res['markers'].get(t)}" for t in marked_passes]
    if unmarked_failures or marked_passes:
        pytest.fail("\n".join(lines), pytrace=False)


# -----------------------------------------------------------------------------
# The blanking itself, on small hand-written sources

SOURCE = '''\
import math


def area(r):
    """A docstring stays."""
    # BEGIN ASSIGNMENT circle
    squared = r * r
    return math.pi * squared
    # END ASSIGNMENT


class Shape:
    def grow(self, k):
        if k > 0:
            # BEGIN ASSIGNMENT grow
            self.k = k
            # END ASSIGNMENT
        return self  # code after a region still runs (here: never, the region raises)


def untouched():
    return 1
'''


def test_blank_replaces_each_body_by_a_raise_at_its_indentation_and_keeps_markers():
    text, done = ms.blank(SOURCE)
    assert done == ["circle", "grow"]
    assert "squared" not in text and "self.k = k" not in text
    assert text.count("# BEGIN ASSIGNMENT") == 2 and text.count("# END ASSIGNMENT") == 2
    assert "    raise NotImplementedError('assignment circle (area): " in text
    assert "\n            raise NotImplementedError('assignment grow (Shape.grow): " in text
    ns = {}
    exec(compile(text, "student.py", "exec"), ns)
    assert ns["untouched"]() == 1
    assert ns["area"].__doc__ == "A docstring stays."
    with pytest.raises(NotImplementedError, match="assignment circle"):
        ns["area"](2.0)
    with pytest.raises(NotImplementedError, match="assignment grow"):
        ns["Shape"]().grow(1)
    assert ns["Shape"]().grow(0) is not None  # the rest of the function is intact


def test_blank_only_a_subset_leaves_the_other_regions_as_they_are():
    text, done = ms.blank(SOURCE, only={"grow"})
    assert done == ["grow"] and "return math.pi * squared" in text and "self.k = k" not in text


@pytest.mark.parametrize("bad, why", [
    ("def f():\n    # BEGIN ASSIGNMENT a\n    return 1\n", "has no END"),
    ("def f():\n    return 1\n    # END ASSIGNMENT\n", "without a BEGIN"),
    ("def f():\n    # BEGIN ASSIGNMENT a\n    # BEGIN ASSIGNMENT b\n    # END ASSIGNMENT\n", "inside the region"),
    ("# BEGIN ASSIGNMENT a\nx = 1\n# END ASSIGNMENT\n", "module level"),
    ("def f():\n    # BEGIN ASSIGNMENT\n    return 1\n    # END ASSIGNMENT\n", "malformed"),
])
def test_malformed_markers_are_reported_with_their_line(bad, why):
    with pytest.raises(ValueError, match=why):
        ms.blank(bad, where="x.py")


# -----------------------------------------------------------------------------
# The markers in the real suite

def test_the_issue_assignments_exist_in_the_source(source_assignments):
    assert REQUIRED <= set(source_assignments), f"missing regions: {sorted(REQUIRED - set(source_assignments))}"


def test_every_assignment_has_a_marked_test_and_every_marker_is_registered(source_assignments, reference_markers):
    used = {m for ms_ in reference_markers.values() for m in ms_} - BUILTIN_MARKERS
    ungraded = sorted(a for a in source_assignments if a not in used)
    assert not ungraded, f"assignments no test is marked with: {ungraded}"
    unregistered = sorted(used - registered_markers())
    assert not unregistered, f"markers used in tests but not registered in pyproject.toml: {unregistered}"


def test_student_copy_compiles_and_differs_only_inside_the_regions(tmp_path, source_assignments):
    out = tmp_path / "copy"
    blanked = ms.make_student(out)
    assert set(blanked) == set(source_assignments)
    for rel in ms.repo_files(ms.ROOT):
        ref, stu = (ms.ROOT / rel).read_bytes(), (out / rel).read_bytes()
        if not ms.is_source(rel) or not ms.find_regions(ref.decode(), rel):
            assert stu == ref, f"{rel} changed"
            continue
        n_regions = len(ms.find_regions(ref.decode(), rel))
        text = stu.decode()
        compile(text, rel, "exec")
        assert len(re.findall(r"raise NotImplementedError\(['\"]assignment ", text)) == n_regions
        assert ms.find_regions(text, rel) and len(ms.find_regions(text, rel)) == n_regions


# -----------------------------------------------------------------------------
# The autograder property, end to end

def test_all_assignments_blanked_exactly_the_marked_tests_fail(tmp_path_factory, source_assignments):
    blanked, res = outcomes_in_copy(tmp_path_factory, None)
    check_exact_failures(res, set(blanked), "every assignment")


def test_only_rewards_blanked_exactly_the_rewards_tests_fail(tmp_path_factory):
    blanked, res = outcomes_in_copy(tmp_path_factory, {"rewards"})
    assert blanked == ["rewards"]
    check_exact_failures(res, {"rewards"}, "only rewards")
