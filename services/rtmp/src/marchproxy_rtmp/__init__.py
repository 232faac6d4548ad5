"""MarchProxy rtmp service."""
