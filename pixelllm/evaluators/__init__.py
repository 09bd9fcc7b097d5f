"""Evaluators of the paper's tasks, with the official definitions: numpy on the host, fed after
(jitted) inference. Each metric family is one class with ``add(...)`` per image and
``result() -> dict[str, float]``, usable alone or from the trainer (logged as
``eval/<name>/<key>``)."""
