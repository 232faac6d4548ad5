"""Sans-IO wire parsers: no asyncio, sockets, grpc or structlog here."""
