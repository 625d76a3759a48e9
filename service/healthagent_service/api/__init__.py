"""The gRPC API layer: validation, the servicer, errors -> status, events -> protobuf."""
