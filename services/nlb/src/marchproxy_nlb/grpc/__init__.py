"""NLBService over gRPC: request validation and translation to registry/data-plane calls."""
