"""`python -m stage2.catalog output_dir=...`: the hand-off files of an output folder, rebuilt without a model."""
