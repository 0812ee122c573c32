"""The classroom assignments a test exercises, as pytest markers (see tests/make_student.py): a test
carries the marker of every assignment its code path runs through, so that exactly the tests of an
unfinished assignment fail in a student's copy."""
import pytest

MODEL = ("rmsnorm_rope", "gate", "balance")                      # any forward pass of the model
GRPO = MODEL + ("advantages", "grpo_loss", "rewards")            # any GRPO step
ALL = GRPO + ("mla_absorb",)                                     # whole pipelines (generation uses the cache)


def needs(*assignments):
    """Decorator: mark a test with each of the named assignments."""
    def mark(test):
        for name in assignments:
            test = getattr(pytest.mark, name)(test)
        return test
    return mark
