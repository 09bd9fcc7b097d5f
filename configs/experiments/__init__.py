"""Experiments: one model config and one data config tied by a single set of sizes."""
