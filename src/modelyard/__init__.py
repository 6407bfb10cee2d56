"""modelyard: one OpenAI-compatible endpoint in front of many on-demand model engines."""

__version__ = "0.1.0"
