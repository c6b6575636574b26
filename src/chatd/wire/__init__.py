"""Wire-format checks and translations that both the surfaces and the providers use."""
