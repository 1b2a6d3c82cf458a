"""v4serve: the hosted ``/v4/completions`` API on your own GPUs, through vLLM."""

__version__ = "0.1.0"
