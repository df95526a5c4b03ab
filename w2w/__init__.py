"""w2w: words to watts — time and energy of LLM inference on HPC clusters."""
