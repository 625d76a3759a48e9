"""The built-in offline upstream: ChatKit sessions and conversations over real HTTP."""
