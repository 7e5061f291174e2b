"""Model workers: one process per device, taking batches from Redis and running ONNX Runtime."""
