"""The one exception every dataset loader raises for missing or broken data files.

A user who hits a data problem usually cannot fix it from a traceback: they need to know
which file was read, what the loader wanted to find there, and where correct files come
from. Forcing all three into the constructor means no loader can raise a vague error.
"""

from __future__ import annotations


class DataError(Exception):
    """A dataset file or folder is missing, unreadable, or not in the expected format.

    The message always names the path, what was expected, and how to obtain the data;
    ``found`` (optional) says what was there instead.
    """

    def __init__(self, path: str, expected: str, how_to_get: str, found: str | None = None):
        self.path = str(path)
        self.expected = expected
        self.how_to_get = how_to_get
        self.found = found
        message = f"{self.path}: expected {expected}"
        if found:
            message += f", but found {found}"
        message += f". How to get the data: {how_to_get}"
        super().__init__(message)

    def __reduce__(self):
        # Keep the exception picklable (e.g. across multiprocessing) despite the
        # custom constructor signature.
        return (type(self), (self.path, self.expected, self.how_to_get, self.found))
