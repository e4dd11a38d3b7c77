"""The bertstream gRPC service: transport (service.py), batching (batcher.py), model (engine.py)."""
