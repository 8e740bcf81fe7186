"""rwkv-gateway: one RWKV model served behind many API dialects through one batching engine."""

__version__ = "0.1.0"
