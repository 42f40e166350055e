"""One error type for problems the user can fix; the CLI prints these without a traceback."""


class NimaError(Exception):
    """A problem with the user's input, with the fix named in the message."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or fail with the pip extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise NimaError(f"{purpose} needs {module.split('.')[0]}, which is not installed",
                        f"pip install 'nima-edge[{extra}]'") from e
