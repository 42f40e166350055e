"""What every bad-input test checks of the CLI's answer."""


def one_line_error(result, *needles):
    """exit 2, a problem line and a fix line, no traceback."""
    code, stdout, stderr = result
    assert code == 2, stderr + stdout
    assert "Traceback" not in stderr and "fix:" in stderr, stderr
    for needle in needles:
        assert needle in stderr.replace("\n", " "), stderr
