"""MarchProxy shared library."""
