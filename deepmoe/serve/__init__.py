"""`deepmoe serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

protocol.py holds the wire schemas, async_engine.py the bridge between the engine's thread and asyncio,
metrics.py the Prometheus metrics, app.py the routes. Needs the `serve` extra; `import deepmoe` never
imports this package.
"""
