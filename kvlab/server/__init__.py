"""``kvlab serve``: an OpenAI-compatible server where encoded (compressed) contexts are shared.

The top layer of the house: it may import every other kvlab module, and nothing imports it.

- :mod:`kvlab.server.app`: the FastAPI app (endpoints, SSE streaming, errors), ``serve``;
- :mod:`kvlab.server.protocol`: the OpenAI request and response shapes, checked;
- :mod:`kvlab.server.worker`: the one engine thread and its bounded queue;
- :mod:`kvlab.server.store`: encoded contexts in a radix tree of token ids, LRU by bytes;
- :mod:`kvlab.server.auth`: API keys and tenants;  :mod:`kvlab.server.metrics`: Prometheus.
"""

from __future__ import annotations

from kvlab.server.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
