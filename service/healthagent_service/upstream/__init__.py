"""Upstream adapters: each speaks one wire protocol and yields `events.ChatEvent`s."""
