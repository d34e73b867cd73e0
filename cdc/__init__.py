"""Source side of pgderive: LSNs, the change model, wal2json decoding, the slot reader, snapshots.

Data flow: ``slot`` (replication protocol) → ``wal2json`` (decoding) → ``changes.Transaction``.
"""
