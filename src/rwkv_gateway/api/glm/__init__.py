"""ChatGLM-style API: /chat, /chat-stream, /embedding (and the GLM shape of /tokenize)."""
