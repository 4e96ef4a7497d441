"""Minimal reference decoder for custom engines. Not implemented yet: tracked as its own issue."""
