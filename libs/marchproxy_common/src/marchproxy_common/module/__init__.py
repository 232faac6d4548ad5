"""The module runtime every MarchProxy module shares: hooks, servicer, registration, lifecycle."""
