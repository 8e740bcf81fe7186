"""The vendored rwkv-api suite (./tests) runs only through tests/clients/test_rwkv_api_sdk.py, against a
live server on port 8000 and with the sdist's own pytest settings; the main run must not collect it."""

collect_ignore = ["tests"]
