"""Upstream providers behind one interface (see :mod:`marchproxy_ailb.providers.base`)."""

from __future__ import annotations

from .anthropic import AnthropicProvider
from .base import ChunkStream, Provider
from .ollama import OllamaProvider
from .openai import OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
}

__all__ = ["PROVIDERS", "AnthropicProvider", "ChunkStream", "OllamaProvider", "OpenAIProvider"]
__all__ += ["Provider"]
