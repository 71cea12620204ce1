"""Pretraining: config -> data -> model -> optimisation step -> checkpoints, for one process or torchrun."""
