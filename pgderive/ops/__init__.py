"""Operator commands on top of the runtime: offline rebuild, verify (and repair), dead-letter retry."""
