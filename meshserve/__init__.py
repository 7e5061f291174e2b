"""meshserve: a gRPC mesh that serves many ONNX models to many tenants on shared GPUs."""

__version__ = "0.1.0"
