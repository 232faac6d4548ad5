"""MarchProxy alb service."""
