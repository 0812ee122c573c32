"""The arithmetic task nanor1 learns: problems in graded levels, worked solutions, a held-out split."""
from .arith import (LEVELS, OUTSIDE, Problem, is_heldout, make_problem, parse_problem,  # noqa: F401
                    subset, test_set, training_problems, worked_solution, worked_solutions,
                    column_steps)
