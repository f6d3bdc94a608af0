"""The one exception type users see: a single line naming the file and the problem."""


class PipelineError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
