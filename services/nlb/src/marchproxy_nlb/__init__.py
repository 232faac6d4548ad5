"""MarchProxy nlb service."""
