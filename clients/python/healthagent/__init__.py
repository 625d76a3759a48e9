"""HealthAgent Python client: generated stubs (`healthagent.v1`) and a small client."""
