"""MarchProxy ailb service."""
