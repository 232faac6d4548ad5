"""Upstream providers behind one interface (see :mod:`marchproxy_ailb.providers.base`)."""

from __future__ import annotations

from marchproxy_ailb.providers.anthropic import AnthropicProvider
from marchproxy_ailb.providers.base import ChunkStream, Provider
from marchproxy_ailb.providers.ollama import OllamaProvider
from marchproxy_ailb.providers.openai import OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
}

__all__ = ["PROVIDERS", "AnthropicProvider", "ChunkStream", "OllamaProvider", "OpenAIProvider"]
__all__ += ["Provider"]
