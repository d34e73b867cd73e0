"""The daemon: the coordinator (bootstrap or resume), the streaming loop, one lane per sink,
checkpoints, retries and stats. ARCHITECTURE.md, "The flow" and "Lanes"."""
