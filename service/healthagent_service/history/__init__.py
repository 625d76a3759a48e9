"""Conversation history and upstream-session records: one interface, SQLite or PostgreSQL."""
