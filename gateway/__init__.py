"""The gateway: KServe v2 over gRPC in front of the Redis request queues."""
