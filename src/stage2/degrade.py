"""`python -m stage2.degrade truth_dir=DIR output_dir=DIR seed=N`: see stage2.train.degrade."""

from .runtime import run_then_exit
from .train.degrade import main

if __name__ == "__main__":
    run_then_exit(main)
