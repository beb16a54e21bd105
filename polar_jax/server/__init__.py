"""The OpenAI-compatible HTTP server over the serving engine, and its load benchmark.

app.build_app makes the FastAPI app; `polar serve` (cli.py) runs it with uvicorn; `polar bench serve`
(bench.py) measures it. Nothing is imported here, so the `polar` CLI starts without FastAPI or JAX.
"""
