"""mcpd-publish: the publisher agent.

It runs next to an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, ...), dials
out to an mcpd broker, registers the models it serves, holds the control stream, and answers
the broker's tasks by calling the local server. It imports nothing from Django: it runs on
machines without the broker. The wire contract is PROTOCOL.md; the guide is docs/publisher.md.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
