"""Real protocol peers the tests talk to over sockets."""
