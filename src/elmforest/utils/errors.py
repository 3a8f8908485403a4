"""The project's own error types: what the CLI reports as one line and exit status 2.

Everything here is a problem a person can act on (bad input, a file that is missing, corrupt or in
the way, a run that diverged). Anything else that escapes is a bug in elmforest and keeps its
traceback. Each type also subclasses the matching built-in (ValueError, FileNotFoundError, ...) so
code and tests that expect the built-in keep working.
"""

from __future__ import annotations


class ElmforestError(Exception):
    """Base of every error the command line turns into `elmforest: error: <message>`."""


class UserError(ElmforestError, ValueError):
    """Bad input: an argument, a config, or a file's contents; the message names which."""


class NotFound(ElmforestError, FileNotFoundError):
    """A file or directory the command needs is not there; the message names it."""


class AlreadyExists(ElmforestError, FileExistsError):
    """An output would replace something that is not an earlier output of the same command."""


class Diverged(ElmforestError, FloatingPointError):
    """Training or evaluation produced a non-finite loss."""


class NonFiniteWeights(UserError, Diverged):
    """Saved weights hold NaN or inf: a corrupt file, or a run that trained past its divergence (a sweep
    takes such a point as diverged, as it takes a non-finite loss)."""


class Failed(ElmforestError, RuntimeError):
    """Work that could not be completed (a job that failed after retries, a locked run directory)."""


class WriteError(ElmforestError, OSError):
    """The file system refused a write (disk full, read-only, permissions); the message names the path.
    Nothing was changed: every artifact is written beside its destination and renamed into place."""
