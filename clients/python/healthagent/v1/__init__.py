"""Generated protobuf and gRPC stubs for healthagent.v1 (see clients/python/generate_stubs.py)."""
