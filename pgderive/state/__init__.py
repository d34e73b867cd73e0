"""pgderive's own state in the source database (schema ``pgderive``, versioned SQL migrations):
slot state, the view registry, dead letters, aggregate contributions and group states.
ARCHITECTURE.md, "State"."""
