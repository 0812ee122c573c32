"""The arithmetic task nanor1 learns: problems in graded levels, worked solutions, a held-out split."""
from .arith import (LEVELS, Problem, is_heldout, make_problem, test_set, training_problems,  # noqa: F401
                    worked_solution, column_steps)
