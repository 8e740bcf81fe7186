"""Role-play API, wire-compatible with RWKV_Role_Playing_API and its Vue UI."""
