"""Fault-injection scenarios over Redis Sentinel and a plain Redis (``pytest -m faults``)."""
