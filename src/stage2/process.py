"""Ending an entry-point process quickly.

After `import terratorch`, the interpreter's own shutdown (tearing down thousands of modules) takes
about 2.5 s on a 2-core machine: more than a whole batch of tiles. Once every output is written and
closed, the entry points run the atexit handlers (logging, DataLoader workers, ...), flush stdio and
leave with os._exit, skipping that teardown.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Callable


def exit_now(code: int | None) -> None:
    """Run atexit handlers, flush, and end the process with `code` (None means 0)."""
    code = 0 if code is None else code
    if not isinstance(code, int):     # sys.exit("message") semantics
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def run_then_exit(main: Callable[[], object]) -> None:
    """`if __name__ == "__main__"` of a Hydra entry point: run it, then exit_now with its exit code."""
    try:
        main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)
