"""alignserve: an OpenAI-compatible inference server for decoding-time alignment."""

__version__ = "0.1.0"
