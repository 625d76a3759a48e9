"""The HealthAgent gRPC service."""
