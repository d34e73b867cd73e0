"""Property test: the widget store's views (config/store.yaml: include two levels deep, where,
aggregates over an include) under its seeded random workload on every table, with the daemon
``kill -9``ed and restarted several times; afterwards ``pgderive verify`` must report every
view equal to a fresh snapshot of the source."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time

import pytest
import yaml

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, create_database, current_lsn, drop_database,
                      drop_views, slot_caught_up, streaming, unique, wait_until)

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("pgderive_store_demo", ROOT / "scripts" / "store.py")
assert _spec is not None and _spec.loader is not None
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)


@pytest.mark.parametrize("seed", [5, 23])
def test_store_views_survive_kill9_under_random_workload(tmp_path, seed):
    db = unique("pgd_store")
    dsn = create_database(db)
    slot, p = unique("slot"), unique("st")
    config = tmp_path / "store.yaml"
    spec = yaml.safe_load((ROOT / "config" / "store.yaml").read_text().replace(" on: ", ' "on": '))
    views = {}
    for name, v in spec["views"].items():
        v = dict(v)
        if "key" in v:
            v["key"] = f"{p}:{v['key']}"
        if "index" in v:
            v["index"] = f"{p.lower()}_{v['index']}"
        views[f"{p}_{name}"] = v
    config.write_text(yaml.safe_dump({
        "source": {"dsn": dsn, "slot": slot},
        "sinks": {"cache": {"type": "redis", "url": REDIS_URL}, "search": {"type": "opensearch", "hosts": [OPENSEARCH_URL]}},
        "views": views}, sort_keys=False))
    log = tmp_path / "daemon.log"
    d = None
    try:
        store.schema(dsn)
        store.load(dsn, 0.2)
        d = Daemon(config, log).start()
        wait_until(lambda: d.alive() and streaming(dsn, slot), 180, what="bootstrap")
        counts: list[dict] = []
        w = threading.Thread(target=lambda: counts.append(store.workload(dsn, 16, seed=seed)))
        w.start()
        kills = 0
        try:
            while w.is_alive() and kills < 4:
                time.sleep(3)
                d.kill9()
                kills += 1
                d = Daemon(config, log).start()
        finally:
            w.join()
        target = current_lsn(dsn)
        wait_until(lambda: (d.alive() or pytest.fail(d.output()[-3000:])) and slot_caught_up(dsn, slot, target),
                   240, what="slot to catch up")
        assert kills >= 3 and counts and counts[0]["failed"] == 0, (kills, counts)
        for name in views:
            out = subprocess.run([sys.executable, "-m", "pgderive.cli", "verify", "-c", str(config), name],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f"{name}:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}\n{d.output()[-2000:]}"
        print(f"seed {seed}: {kills} kills, {sum(v for k, v in counts[0].items() if k not in ('retried', 'failed'))} "
              f"workload transactions; every view verified equal")
    finally:
        if d is not None and d.alive():
            d.stop()
        drop_views(config)
        drop_database(db)
