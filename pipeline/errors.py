"""The one exception type users see: a single line naming the file and the problem."""


class PipelineError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero.

    Line breaks in the message (a file name may hold one) are written as `\\n` and `\\r`, so the message
    stays one line whatever it names."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
