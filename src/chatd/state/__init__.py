"""What outlives a request: shared state, the cache, callers and the usage ledger."""
