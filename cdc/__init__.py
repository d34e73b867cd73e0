"""Source side of pgderive: LSNs, the change model, wal2json decoding, the slot reader, snapshots.

Data flow: ``slot`` (replication protocol) → ``wal2json`` (decoding) → ``changes.Transaction``.
``slot.ChangeReader`` is what the runtime needs of a stream; ``testing.ListReader`` feeds one
from a list of wal2json messages in tests.
"""
