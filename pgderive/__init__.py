"""pgderive, the application: the daemon and its tools on top of ``cdc``, ``sinks`` and ``views``.

``state`` (pgderive's own tables in the source database) ← ``runtime`` (the daemon: coordinator,
stream, per-sink lanes, checkpoints) ← ``ops`` (operator commands) ← ``cli``. ARCHITECTURE.md,
"Layers".
"""
