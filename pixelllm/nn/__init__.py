"""Shared building blocks: layers that carry logical axis names."""
