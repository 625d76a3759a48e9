"""The HTTP listener: gRPC-Web, the seeds' SSE contract, and the demo page."""
