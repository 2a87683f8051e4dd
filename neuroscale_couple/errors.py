"""The one family of errors NeuroScale raises.

Every message names the offending input and says how to fix it, so that a user reading the
traceback of a long MPI run knows what to change without opening the source.
"""

from __future__ import annotations


class NeuroScaleError(Exception):
    """Base class of every error raised on purpose by NeuroScale."""


class InputError(NeuroScaleError, ValueError):
    """Bad user input: a parameter, a configuration key, an array of the wrong shape."""


class SolveError(NeuroScaleError, RuntimeError):
    """A fine-scale solve did not converge, even after the retry policy was exhausted."""


class CheckpointError(NeuroScaleError):
    """A model or run checkpoint is missing, corrupt, or of another format or family."""


class RetrainError(NeuroScaleError):
    """An online retraining failed (on any rank; raised on every rank): the model it started
    from is kept."""


class MaterialOutsideError(InputError):
    """The fine solver's phases lie outside the phase ranges a family operator was trained over
    (run anyway with the policy's ``outside_material: fallback``)."""
