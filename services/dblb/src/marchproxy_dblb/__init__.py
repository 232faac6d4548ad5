"""MarchProxy dblb service."""
