"""RWKV-Server Task API (/v1/tasks/*) for the rwkv-api SDK."""
