"""The generation engines by name (placeholder until the engines package lands)."""

ENGINES: dict[str, str] = {"fast": "static cache, CUDA graphs", "reference": "Meta's Llama 2 schedule"}
