"""Reading public checkpoint files and converting them to the project's parameters."""
