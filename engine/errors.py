"""The engine's error types. Everything a caller sent wrong raises ``InvalidInput``."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidInput(EngineError, ValueError):
    """Input the engine refuses: names the offending field and the problem.

    ``field`` is a dotted path into the request (``claims[2].items[0].amount``); ``problem`` is
    a sentence a person can act on. No partial result is ever returned with it.
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self):   # pickled by its fields (the server's writer process sends it)
        return type(self), (self.field, self.problem)


class NoPolicyInForce(InvalidInput):
    """The service date is before the first effective date of the region's policy."""


class PolicyFileError(EngineError):
    """A policy file is malformed: names the file, the parameter path and the problem."""

    def __init__(self, file: str, path: str, problem: str):
        self.file = file
        self.path = path
        self.problem = problem
        super().__init__(f"{file}: {path}: {problem}")

    def __reduce__(self):
        return type(self), (self.file, self.path, self.problem)
