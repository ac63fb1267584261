"""`python -m stage2.train ...`: the train app, then a fast process exit (stage2.runtime.exit_now)."""

from ..runtime import run_then_exit
from .app import main

if __name__ == "__main__":
    run_then_exit(main)
