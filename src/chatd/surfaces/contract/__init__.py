"""The published contract, a module per surface: what `/openapi.json` says routes take and answer.

Routes read their bodies themselves (for speed, strict typing and the error envelope), so
FastAPI cannot infer their schemas; they declare them here instead. Every status a route
can answer is documented, errors as the one error envelope (`ErrorResponse`), with the
headers a caller acts on. Generated clients (openapi-python-client) and contract tests
(schemathesis) read this document, so it must match what the code does: a constraint
the code enforces is in the schema, and the schema promises nothing the code refuses.
"""
