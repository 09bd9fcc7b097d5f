"""Training: the optimizer, the trained parameter set, the train step and its loop."""
