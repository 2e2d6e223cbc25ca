"""Errors that tell a user what to fix."""


class InputTypeError(TypeError, ValueError):
    """A value of the wrong type in user input (a config option, an annotation file, a prediction): a
    ``TypeError`` to API callers and a ``ValueError`` to the CLI, which prints bad input as one line.
    A ``TypeError`` of any other kind is a bug and keeps its traceback."""
