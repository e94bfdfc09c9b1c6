"""The Ray Serve layer: an OpenAI-compatible HTTP endpoint for a target + KOALA drafter (`serve.app.build_app`).

Only `serve.app` imports Ray; `serve.config`, `serve.openai_api` and `serve.engine` are plain Python so they can be
tested without a cluster.
"""
