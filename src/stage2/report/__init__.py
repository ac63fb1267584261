"""The report pipeline: check a finished Stage 2 run and draw what a person needs to trust it (docs/usage.md#quality).

`app` (the Hydra app: `python -m stage2.report`), `check` (inputs vs outputs, docs/output.md validation,
quality), `page` (index.html), `figures` (PNGs; also used by stage2.evaluate).
"""
