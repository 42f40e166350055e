"""A training run stopped at a chosen evaluation, as a crash would stop it (the resume tests)."""


class Crash(Exception):
    """Raised by the callback of `at`."""


def at(step: int):
    """An `on_eval` callback that raises Crash at the evaluation of `step`."""
    def on_eval(done: int, metrics: dict) -> None:
        if done == step:
            raise Crash
    return on_eval
