"""What the tests share apart from fixtures (those live in tests/conftest.py): settings and a
service over a real socket, call helpers, certificates, databases, raw servers and clients,
the agent server, the browser and podman. Nothing here imports a test module or conftest."""
