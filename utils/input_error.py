"""The exception for settings a run cannot start with: a bad flag, or flags that do not fit
together or with the data (a model for another dataset, more clients than examples).

It is raised by the project's own checks only, with a message that says what was wrong and
what is allowed, so that ``main.py`` can print it as one ``error: ...`` line (as it does
``data.errors.DataError`` and ``utils.checkpoint.CheckpointError``) while any other
exception, a bug, still surfaces as a traceback. It subclasses ``ValueError`` so that
callers (and tests) that expect the ``ValueError`` these checks raised before still work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class InputError(ValueError):
    """A setting the run cannot start with; the message names it and what is allowed."""


@contextlib.contextmanager
def input_errors(prefix: str = "") -> Iterator[None]:
    """Re-raises a ``ValueError`` from the block as an ``InputError`` (with ``prefix``).

    Only for calls whose ``ValueError`` can only mean that the user's settings were
    refused (a name lookup, a model that does not fit the data), never around arbitrary
    computation, where a ``ValueError`` may be a bug.
    """
    try:
        yield
    except InputError:
        raise
    except ValueError as err:
        raise InputError(f"{prefix}{err}") from err
