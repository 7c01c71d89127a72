"""HTTP gateway: OpenAI API, scheduling client (planned: issue 4)."""
