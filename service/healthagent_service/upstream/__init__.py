"""Upstream adapters: each speaks one wire protocol and yields `domain.events.ChatEvent`s."""
