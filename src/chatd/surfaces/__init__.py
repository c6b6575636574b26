"""HTTP in: each route chatd serves, and the OpenAPI contract it publishes (docs/design.md)."""
