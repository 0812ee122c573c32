"""The arithmetic task nanor1 learns: problems in graded levels, worked solutions (plain and
reflective), a held-out split; data/reflect.py judges the reflection in the model's own traces."""
from .arith import (ALL_LEVELS, EDGE_LEVEL, LEVELS, OUTSIDE, Problem, column_steps,  # noqa: F401
                    is_heldout, make_problem, only_training, parse_problem, reflective_solution,
                    subset, test_set, training_problems, worked_solution, worked_solutions)
