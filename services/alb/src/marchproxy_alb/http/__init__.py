"""HTTP/1.1 I/O for the ALB: asyncio Protocols around httptools (llhttp) plus pure framing."""
