"""Registers the built-in backends through the same hook a plugin uses."""
