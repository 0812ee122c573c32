"""
Write a student copy of nanor1 for a class: every solution region

    # BEGIN ASSIGNMENT <name>
    ...reference code...
    # END ASSIGNMENT

in the source (every .py file outside tests/) has its body replaced by
`raise NotImplementedError("assignment <name> (<function>): <hint>")` at the region's indentation.
The markers stay, so `diff -r . student/` shows a teacher exactly what was taken out. Everything
else (tests included: they are the autograder) is copied unchanged.

    python tests/make_student.py                         # all assignments -> ./student/
    python tests/make_student.py --only gate,balance     # blank a subset
    python tests/make_student.py --out /tmp/class1 --no-list

Then, per assignment, it prints the command that grades it and the tests that command runs:
tests carry a pytest marker named after each assignment they exercise (@pytest.mark.gate).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".nanor1-student"  # written into every copy, so --out can safely replace an old copy

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN ASSIGNMENT (?P<name>\w+)[ \t]*$")
END = re.compile(r"^[ \t]*# END ASSIGNMENT\b")
DEF = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+)?(?P<kind>def|class)[ \t]+(?P<name>\w+)")

# One line per assignment, or per function of a multi-function assignment, shown to the student
# in the NotImplementedError ("*" is the fallback for functions not listed).
HINTS = {
    "rmsnorm_rope": {
        "RMSNorm.forward": "x / sqrt(mean(x^2) over the last dim + eps) * weight, computed in fp32, "
                           "returned in x's dtype",
        "precompute_freqs_cis": "theta_j = rope_theta^(-2j/d) for j < d/2; return e^(i * pos * theta_j) for "
                                "every pos < max_seq_len as a complex (max_seq_len, d/2) tensor",
        "*": "view consecutive pairs (x0,x1),(x2,x3),... as complex numbers, multiply by freqs_cis, "
             "view back as real; keep x's dtype",
    },
    "mla_absorb": "fold W_UK (the k_nope rows of wkv_b) into the query, attend over the cached latent c_KV "
                  "and k_R (softmax in fp32), then apply W_UV (the v rows of wkv_b) after the softmax",
    "gate": "scores = softmax or sigmoid of x @ weight.T; choose top-k on scores + bias (within the kept "
            "groups); weights from the un-biased scores, normalised for sigmoid, times route_scale",
    "balance": {
        "MoE.balance_loss": "alpha * sum_i f_i * P_i per sequence, averaged over sequences "
                            "(DeepSeek-V3 eqs. 17-20); only P carries gradient",
        "*": "sum the gate loads over DDP ranks, b_i += gamma * sign(mean_load - load_i), "
             "reset the loads, return the loads used",
    },
    "advantages": "A_i = (r_i - mean of its group) / (std of its group + eps); std only if scale_by_std",
    "grpo_loss": {
        "masked_mean": "sum(x * mask) / sum(mask), over everything or along dim",
        "kl_k3": "with d = ref_logp - logp: exp(d) - d - 1",
        "*": "ratio = exp(logp - old_logp); per token -min(ratio*A, clip(ratio, 1-clip_low, 1+clip_high)*A) "
             "+ beta * kl_k3; aggregate as agg says; stats clip_frac and kl",
    },
    "rewards": {
        "parse_answer": "parse, never eval: the integer (ASCII digits, optional minus) inside the single "
                        "<answer>...</answer>, else None",
        "accuracy_reward": "1.0 iff parse_answer(completion) == answer",
        "*": "1.0 iff <think>...</think><answer>...</answer>: one of each tag, in order, neither part empty, "
             "only whitespace around",
    },
}


def hint(name: str, func: str) -> str:
    h = HINTS.get(name, "see the README")
    if isinstance(h, dict):
        h = h.get(func) or h.get(func.rsplit(".", 1)[-1]) or h.get("*", "see the README")
    return h


# -----------------------------------------------------------------------------
# Files and regions

def repo_files(root: Path, exclude=()) -> list:
    """Paths (relative) of the repository: tracked and untracked-but-not-ignored files, or, outside
    git, a walk that skips .git, out/, student/ and caches."""
    exclude = [Path(os.path.abspath(e)) for e in exclude]
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "out", "student", "__pycache__", ".pytest_cache", ".benchmarks", STAMP}
        names = []
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip)
            names += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files)
                      if f not in skip and not f.endswith(".pyc")]
    keep = []
    for n in names:
        p = (root / n)
        if not p.is_file() or any(Path(os.path.abspath(p)).is_relative_to(e) for e in exclude):
            continue  # deleted in the working tree, or inside the output directory itself
        keep.append(n)
    return keep


def is_source(rel: str) -> bool:
    parts = Path(rel).parts
    return rel.endswith(".py") and parts[0] != "tests"


def find_regions(text: str, where: str = "<source>") -> list:
    """-> [(name, begin_line, end_line, indent)], 0-based line numbers of the two markers."""
    regions, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        m = BEGIN.match(line)
        if m:
            if open_:
                raise ValueError(f"{where}:{i + 1}: BEGIN ASSIGNMENT inside the region opened at line {open_[1] + 1}")
            if not m["indent"]:
                raise ValueError(f"{where}:{i + 1}: assignment {m['name']} is at module level; "
                                 "a region must be inside a function, or importing the copy raises")
            open_ = (m["name"], i, m["indent"])
        elif END.match(line):
            if not open_:
                raise ValueError(f"{where}:{i + 1}: END ASSIGNMENT without a BEGIN")
            regions.append((open_[0], open_[1], i, open_[2]))
            open_ = None
        elif "ASSIGNMENT" in line and line.lstrip().startswith("# BEGIN"):
            raise ValueError(f"{where}:{i + 1}: malformed marker {line.strip()!r} (want '# BEGIN ASSIGNMENT <name>')")
    if open_:
        raise ValueError(f"{where}:{open_[1] + 1}: BEGIN ASSIGNMENT {open_[0]} has no END ASSIGNMENT")
    return regions


def enclosing_function(lines: list, i: int, indent: str) -> str:
    """Qualified name of the def (and class) that line i sits in, e.g. "Gate.forward"."""
    names, width = [], len(indent.expandtabs())
    for line in reversed(lines[:i]):
        m = DEF.match(line)
        if m and len(m["indent"].expandtabs()) < width:
            names.append(m["name"])
            width = len(m["indent"].expandtabs())
            if width == 0:
                break
    return ".".join(reversed(names))


def blank(text: str, only=None, where: str = "<source>") -> tuple:
    """-> (student text, [assignment names blanked]). only: a set of names, or None for all."""
    lines = text.splitlines(keepends=True)
    regions = find_regions(text, where)
    done = []
    for name, b, e, indent in reversed(regions):  # from the bottom, so line numbers stay valid
        if only is not None and name not in only:
            continue
        func = enclosing_function(lines, b, indent)
        msg = f"assignment {name}" + (f" ({func})" if func else "") + f": {hint(name, func)}"
        newline = "\r\n" if lines[b].endswith("\r\n") else "\n"
        lines[b + 1:e] = [f"{indent}raise NotImplementedError({msg!r}){newline}"]
        done.append(name)
    out = "".join(lines)
    compile(out, where, "exec")  # a SyntaxError here is a bug in the markers, not in the student's code
    return out, sorted(set(done))


def assignments(root: Path = ROOT, exclude=()) -> dict:
    """{assignment name: [file, ...]} over the repository's source files."""
    found = {}
    for rel in repo_files(root, exclude):
        if is_source(rel):
            for name, *_ in find_regions((root / rel).read_text(), rel):
                found.setdefault(name, [])
                if rel not in found[name]:
                    found[name].append(rel)
    return found


def make_student(out: Path, only=None, root: Path = ROOT) -> list:
    """Write the student copy to out; -> the assignment names blanked."""
    out, root = Path(os.path.abspath(out)), Path(os.path.abspath(root))
    if out == root or root.is_relative_to(out):
        raise SystemExit(f"error: --out {out} would overwrite the repository itself")
    if out.exists() and any(out.iterdir()):
        if not (out / STAMP).exists():
            raise SystemExit(f"error: {out} exists and is not a student copy; remove it or pick another --out")
        shutil.rmtree(out)
    names = assignments(root, exclude=[out])
    if only is not None and set(only) - set(names):
        raise SystemExit(f"error: unknown assignment(s) {sorted(set(only) - set(names))}; "
                         f"known: {', '.join(sorted(names))}")
    blanked = set()
    for rel in repo_files(root, exclude=[out]):
        src, dst = root / rel, out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if is_source(rel):
            text, done = blank(src.read_text(), only, rel)
            if done:
                dst.write_text(text)
                shutil.copymode(src, dst)
                blanked.update(done)
                continue
        shutil.copy2(src, dst)
    (out / STAMP).write_text(json.dumps({"blanked": sorted(blanked)}) + "\n")
    return sorted(blanked)


# -----------------------------------------------------------------------------
# Running pytest in a copy, recording each test's markers and outcome

_RECORDER = r"""
import json, sys, pytest

class Recorder:
    def __init__(self):
        self.markers, self.outcomes, self.collect_errors, self.messages = {}, {}, {}, {}
    def pytest_collection_finish(self, session):
        for item in session.items:
            self.markers[item.nodeid] = sorted({m.name for m in item.iter_markers()})
    def pytest_collectreport(self, report):
        if report.failed:
            self.collect_errors[report.nodeid] = str(report.longrepr).strip().splitlines()[-1:]
    def pytest_runtest_logreport(self, report):
        o = self.outcomes
        if hasattr(report, "wasxfail"):
            o.setdefault(report.nodeid, "xfailed" if report.skipped else "xpassed")
        elif report.failed:
            o[report.nodeid] = "failed"          # a failing setup or teardown counts too
            crash = getattr(report.longrepr, "reprcrash", None)
            self.messages.setdefault(report.nodeid, crash.message if crash else str(report.longrepr)[-300:])
        elif report.skipped:
            o.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            o.setdefault(report.nodeid, "passed")

r = Recorder()
rc = pytest.main(sys.argv[2:], plugins=[r])
with open(sys.argv[1], "w") as f:
    json.dump({"rc": int(rc), "markers": r.markers, "outcomes": r.outcomes,
               "collect_errors": r.collect_errors, "messages": r.messages}, f)
"""


def run_pytest(repo: Path, args: list, record: Path, timeout=None) -> dict:
    """Run pytest in repo with args; -> {"rc", "markers": {nodeid: [marker]}, "outcomes": {nodeid:
    passed|failed|skipped|xfailed|xpassed}, "messages": {nodeid: why it failed}, "collect_errors":
    {nodeid: [message]}, "output"}."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import the copy, nothing else
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    p = subprocess.run([sys.executable, "-c", _RECORDER, str(record), "-p", "no:cacheprovider", *args],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if not Path(record).exists():
        raise RuntimeError(f"pytest did not run in {repo} (exit {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    res = json.loads(Path(record).read_text())
    res["output"] = p.stdout + p.stderr
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="write a student copy of nanor1 with the assignment bodies blanked")
    ap.add_argument("--out", default=str(ROOT / "student"), help="where to write the copy (default: ./student/)")
    ap.add_argument("--only", default="", help="comma-separated assignments to blank (default: all)")
    ap.add_argument("--no-list", action="store_true", help="do not collect and print the grading tests")
    a = ap.parse_args(argv)
    only = {n.strip() for n in a.only.split(",") if n.strip()} or None
    out = Path(a.out)
    blanked = make_student(out, only)
    print(f"wrote {out}/ with {len(blanked)} assignment(s) blanked: {', '.join(blanked)}")
    if a.no_list:
        return
    res = run_pytest(out, ["--collect-only", "-q"], out / ".collect.json")
    os.remove(out / ".collect.json")
    for node, msg in res["collect_errors"].items():
        print(f"warning: cannot collect {node}: {' '.join(msg)}", file=sys.stderr)
    for name in blanked:
        tests = [t for t, ms in res["markers"].items() if name in ms]
        print(f"\n== {name} ({len(tests)} tests)\n   cd {out} && python -m pytest -m {name}")
        for t in tests:
            print(f"   {t if len(t) <= 120 else t[:117] + '...'}")
        if not tests:
            print("   (no test carries this marker!)")


if __name__ == "__main__":
    main()
