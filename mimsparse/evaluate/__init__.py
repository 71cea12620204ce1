"""Evaluation of pretrained encoders: labelled datasets, finetuning, linear probing, feature collapse."""
