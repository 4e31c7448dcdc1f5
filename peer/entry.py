"""The ``ccied`` console script: Ctrl-C and a closed pipe end quietly, at any moment.

The command line module imports torch, FAISS and zeroconf for some commands,
which takes seconds; a Ctrl-C then used to print a 15-70 line traceback from
inside an import. Here nothing is imported before the handlers are in place.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from ccied.peer.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        print("ccied: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ccied status | head`: the reader left; say nothing more, to anyone.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
