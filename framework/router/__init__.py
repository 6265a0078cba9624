"""Routers: which replica of a simulated cluster serves each arriving request (`replay.router`)."""
