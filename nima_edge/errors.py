"""One error type for problems the user can fix; the CLI prints these without a traceback."""


class NimaError(Exception):
    """A problem with the user's input, with the fix named in the message."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
