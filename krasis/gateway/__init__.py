"""HTTP gateway: the OpenAI API in front of an engine client (in-process today; ZeroMQ pipeline planned)."""
