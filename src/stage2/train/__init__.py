"""The training pipeline: fine-tune the refiner on (Stage 1 output, true optical) pairs.

`app` (the Hydra app), `data` (pairs, crops, sampler), `module` (LightningModule: loss, validation,
optimiser), `degrade` (the simulated Stage 1 errors, and `python -m stage2.degrade`), `evaluate`
(scores against the truth, `python -m stage2.evaluate`), `pretrained` (Prithvi weights from disk).
"""
