"""Baidu wenxinworkshop-style chat API with its OAuth token endpoint and bce-auth-v1 signatures."""
