"""The datasel operator library.

Importing this package registers every operator (see :mod:`datasel.ops.registry`).
One module per family; adding an operator is one declaration in one of them
(or a new module listed here) plus its test.  The algorithms themselves live in
:mod:`datasel.ops.algos` as plain functions on arrays and models.
"""

from datasel.ops import bandit, builtins, dedup, diversity, gradients, graphs, groups, labels, lm, models, planned, scores, selection, targeted  # noqa: F401
