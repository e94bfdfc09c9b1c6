"""The Ray Serve layer: an OpenAI-compatible HTTP endpoint for a target + KOALA drafter (`serve.app.build_app`).

Only `serve.app` imports Ray; `serve.config`, `serve.openai_api`, `serve.engine` and `serve.checks` (what is checked
before deploying) are plain Python so they can be tested without a cluster.
"""
