"""Watching from the ground floor: metrics and the one log line per request."""
