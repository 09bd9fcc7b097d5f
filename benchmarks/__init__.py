"""Speed benchmarks (scripts run with ``python -m benchmarks.<name>``, not tests)."""
