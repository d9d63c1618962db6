"""tokenworks: dispatch, meter, price and settle LLM tokens."""

__version__ = "0.1.0"
