"""HTTP serving: an OpenAI-compatible API, metrics and a web playground for a `Pipeline`.

    from nmm.serve import create_app, load_pipeline
    pipe, name = load_pipeline("runs/demo")        # or a preset name: random weights
    app = create_app(pipe, name, api_key="secret")  # an ASGI app: uvicorn.run(app)

Needs the server extras (fastapi, uvicorn). See docs/server.md.
"""

from nmm.serve.app import build_random_pipeline, create_app, load_pipeline
from nmm.serve.schemas import ApiError, Limits

__all__ = ["ApiError", "Limits", "build_random_pipeline", "create_app", "load_pipeline"]
