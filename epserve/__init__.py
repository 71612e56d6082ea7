"""epserve: mixture-of-experts LLM serving with disaggregated attention and expert workers."""

__version__ = "0.1.0"
