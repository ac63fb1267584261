"""The predict pipeline: Stage 1 tiles in, refined opt_v2 tiles, a summary and a failure list out.

`app` (plan -> build -> execute -> summarise, the Hydra app), `data` (DataModule, size-bucketing
sampler, collate), `module` (LightningModule, OOM policy, CPU streams), `writer` (atomic outputs,
failures), `summary`, `progress`, `sweep` (AOI sweeps). Nothing is imported here, so
`python -m stage2.predict` pays only for what a run needs.
"""
