"""pgderive benchmarks (issue 5): ``python -m bench`` / ``make bench``.

Five scenarios, each measured against a baseline in the same run (see :mod:`bench.report`'s
``METHOD``): backlog drain, live lag, snapshot, memory, scaling curve. Settings come from
``PGDERIVE_BENCH_*`` environment variables (:mod:`bench.settings`).
"""
