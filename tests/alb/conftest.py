"""ALB fixtures (helpers live in alb_support.py)."""

from tests.alb.alb_support import alb, alb_factory, backends

__all__ = ["alb", "alb_factory", "backends"]
