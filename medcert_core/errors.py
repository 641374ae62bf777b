"""Errors the command line reports as one message (exit code 2), besides ValueError, TypeError and
FileNotFoundError."""


class NotebookFailed(RuntimeError):
    """A grid notebook raised; the message names the error, the parameters and the partial copy."""
