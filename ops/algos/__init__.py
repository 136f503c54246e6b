"""Operator algorithms as plain functions on arrays (no engine, no cache)."""
