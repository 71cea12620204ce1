"""Evaluation of pretrained encoders: labelled datasets and loaders, finetuning, linear probing,
predictions of a finetuned classifier, feature collapse, and the papers' ablations."""
