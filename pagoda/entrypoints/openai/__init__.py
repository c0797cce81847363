"""The OpenAI-compatible HTTP API: request/response models, serving classes and routes.

`protocol.py` holds the pydantic shapes, `serving_*.py` turn validated requests into engine calls
and responses, and `router.py` wires them to FastAPI paths. The app factory (`api_server.py`) builds
the serving objects on `app.state` and includes the router.
"""
