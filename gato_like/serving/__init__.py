"""The policy server and its light client.

- :mod:`gato_like.serving.protocol`: msgpack frames and arrays (torch-free), the error codes.
- :mod:`gato_like.serving.engine`: sessions with their KV cache rows, the batching worker thread.
- :mod:`gato_like.serving.server`: the WebSocket server, ``/healthz``, ``/readyz``, ``/metrics``.
- :mod:`gato_like.serving.client`: sync and async clients (numpy, websockets, msgpack; no torch).
- :mod:`gato_like.serving.loadgen`: N simulated robots at a fixed rate; latency percentiles.

Nothing is imported here, so ``import gato_like.serving.client`` never pulls in torch.
"""
