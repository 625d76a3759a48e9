"""Caller authentication, per-user limits, and keeping secrets out of logs."""
