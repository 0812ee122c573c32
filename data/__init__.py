"""The arithmetic task nanor1 learns: problems in graded levels, worked solutions, a held-out split."""
from .arith import (LEVELS, Problem, is_heldout, make_problem, subset, test_set,  # noqa: F401
                    training_problems, worked_solution, column_steps)
