#!/usr/bin/env python
"""The Stage 2 guide's `python infer_stage2.py --checkpoint ... --input_dir ... --output_dir ...`.

A shim for scripts that call the guide's path literally: it is `stage2-infer` (stage2.cli.main),
the same flags, the same Hydra run and the same outputs. Needs stage2 installed (pip install -e .).
"""


from stage2.cli import console_main

if __name__ == "__main__":
    console_main()
