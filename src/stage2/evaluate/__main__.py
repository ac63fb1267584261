"""`python -m stage2.evaluate truth_dir=DIR input_dir=DIR output_dir=DIR`: the evaluate app."""

from ..runtime import run_then_exit
from .app import main

if __name__ == "__main__":
    run_then_exit(main)
