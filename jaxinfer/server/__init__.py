"""gRPC serving: the jaxinfer.v1.Inference service over an EngineLoop, the jaxinfer-serve binary
(main.py) and a small client (client.py)."""
