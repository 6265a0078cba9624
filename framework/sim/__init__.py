"""The simulated model engine's cost models: what a step of a given shape costs, measured on this
machine (`mode=profile`, a fitted model) or predicted for other hardware (a roofline). See
docs/simulator.md."""
