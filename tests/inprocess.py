"""`robolearn ARGS` run inside the test's process, for the tests that check what a command refuses, prints or saves.

robolearn.cli.main is what the console script and `python -m robolearn.cli` call, so the command's parsing, checks
and exit status are the user's; a new Python for every call would pay torch's and MuJoCo's imports (3-4 s of CPU)
each time. A run that must be killed, or whose functions a test patches, starts a real process instead.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from types import SimpleNamespace


def robolearn(*args: str, check: bool = True) -> SimpleNamespace:
    """Run `robolearn ARGS`; returns its `returncode`, `stdout` and `stderr`, as subprocess.run would. With
    `check`, a non-zero status fails the test with the command's output."""
    from robolearn.cli import main

    out, err = io.StringIO(), io.StringIO()
    # pytest records warnings instead of printing them; the command's (a damaged checkpoint skipped, ...) are
    # UserWarnings that its user reads on stderr, formatted by the command (after its own output, here).
    formatwarning = warnings.formatwarning  # commands set their own (robolearn.cli._plain_warnings)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's errors and --help
                code = exit_.code
        err.writelines(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                       for w in caught if issubclass(w.category, UserWarning))
    finally:
        warnings.formatwarning = formatwarning
    proc = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc
