"""Metrics on class activation maps: ROAD (ybROAD) and its imputation, the
energy-based pointing game, map convergence over training, chance baselines,
layer-ranking stability and the model-parameter randomization sanity check."""
