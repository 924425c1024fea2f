"""The OpenAI-compatible API (docs/openai.md): routes, the request body, its errors."""

from .routes import OpenAIRoutes

__all__ = ["OpenAIRoutes"]
