"""MarchProxy api service."""
