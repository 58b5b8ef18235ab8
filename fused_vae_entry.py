"""The ``fused-vae`` command's entry point.

It lives outside the ``fused_vae`` package on purpose: importing the package imports torch,
which takes seconds, and a Ctrl-C during that import must end in one line, like a Ctrl-C at
any other moment, not in a traceback through torch's import machinery.
"""

from __future__ import annotations

import signal
import sys

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def _exiting() -> None:
    """Ignores further Ctrl-C: the command is ending, and its shutdown must print nothing more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`fused_vae.cli.main` on ``argv`` (default: ``sys.argv[1:]``) and returns its exit
    status; a Ctrl-C at any moment, while torch is imported included, prints one line and returns 130."""
    try:
        try:
            from fused_vae.cli import main as cli_main

            code = cli_main(argv)
        except KeyboardInterrupt:
            _exiting()
            print("fused-vae: interrupted", file=sys.stderr, flush=True)
            code = INTERRUPTED
        _exiting()
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being reported
        code = INTERRUPTED
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
