"""The gateway's server: what a client can make it hold, and how a request reaches the data
plane.

- `client`: the `Client` a request is served for (the only module the data plane imports);
- `protocol`: the own HTTP/1.1 protocol (uvicorn's plus bounds; the only module that touches
  uvicorn's internals), which hands inference POSTs to the data plane directly;
- `asgi`: the same through ASGI for anything else, the admin gate and body bounds, and the
  app uvicorn serves.
"""
