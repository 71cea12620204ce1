"""Pretraining: config -> data -> model -> optimisation step -> checkpoints, for one process or torchrun.

``build.py`` wires a run (``build_run`` / ``Pretrainer``) and hands it to ``engine.py``, which trains it."""
