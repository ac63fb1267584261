"""`python -m stage2.catalog ...`: the catalog app."""

from ..runtime import run_then_exit
from .app import main

if __name__ == "__main__":
    run_then_exit(main)
