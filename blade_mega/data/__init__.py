"""The online data path: sample index (global ids), candidate-block sampler, reweighting sidecar."""
