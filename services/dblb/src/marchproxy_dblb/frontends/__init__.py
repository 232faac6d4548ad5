"""Client-facing protocol handlers (one asyncio Protocol per client connection)."""
