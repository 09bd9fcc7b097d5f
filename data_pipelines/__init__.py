"""Data set builders (TFDS, read through grain) and input pipelines; built by the data issue."""
