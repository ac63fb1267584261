"""The evaluate pipeline: did Stage 2 bring Stage 1's tiles closer to the truth?

Only useful where a truth exists (a benchmark, a validation site, or Stage 1 stand-ins made with
`python -m stage2.degrade`), so it is a pipeline of its own rather than part of training.
`score` (read each finished output with its input and truth, and score both), `metrics` (the scores of
one tile: stage2.quality's, SSIM and SAM through torchmetrics, the std's Spearman ranking; torch is
imported only there, when a score needs it), `evaluation` (what was found, its JSON and closing line),
`table` (the terminal's tables), `figures` (one PNG per tile), `app` (the Hydra app:
`python -m stage2.evaluate`, settings in conf/evaluate.yaml).
"""
