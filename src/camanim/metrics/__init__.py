"""Metrics on class activation maps: map convergence over training, chance
baselines for ybROAD, layer-ranking stability and the model-parameter
randomization sanity check."""
