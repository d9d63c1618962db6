"""API keys: minting, hashing at rest, the in-memory cache, scopes and revocation."""
