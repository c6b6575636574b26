"""Choosing and calling a provider: the registry, the dispatcher, balancing, resilience."""
