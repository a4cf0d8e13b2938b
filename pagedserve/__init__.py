"""pagedserve: an LLM serving cluster built around PagedAttention, on Ray."""

__version__ = "0.1.0"
