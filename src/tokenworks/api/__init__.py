"""HTTP surfaces: the consumer API (OpenAI's shape), sub-agent keys, the admin API, OpenAPI.

Handlers parse, call the rooms below (keys, dispatch, ledger, metering) and answer; errors
become responses in one place (errors.py)."""
