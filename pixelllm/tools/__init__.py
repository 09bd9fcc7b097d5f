"""Command-line tools (`python -m pixelllm.tools.<name>`)."""
