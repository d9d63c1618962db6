"""Producers: adapters to real upstreams (a pooled HTTP client per producer)."""
