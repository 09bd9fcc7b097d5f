"""``pixelllm serve``: a local web app over :class:`pixelllm.predictor.Predictor`.

A dependency-free server (the standard library's ``http.server``) and one static page: the
page sends an image and a task's inputs as JSON to ``POST /api/run``; :mod:`.modes` checks and
runs them on the model through :mod:`.worker` (one thread, a bounded queue) and answers with
the result's JSON and its overlay PNG. See :mod:`.server` for the routes and limits.
"""
