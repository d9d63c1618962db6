"""Metering: usage read from upstream answers (or counted offline), and the usage table."""
