"""The datasel operator library.

Importing this package registers every operator (see :mod:`datasel.ops.registry`).
One module per family; adding an operator is one declaration in one of them
(or a new module listed here) plus its test.
"""

from datasel.ops import dedup, groups, scores, selection  # noqa: F401
