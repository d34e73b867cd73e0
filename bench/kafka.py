"""Scenario 7: the change log in Kafka (ARCHITECTURE.md, "Kafka").

``7-workers``: the same published log (a pgbench snapshot and backlog) derived into Redis views
by 1, 2 and 3 derivation workers of a fresh consumer group each (``source.kafka``), timed from
spawning them to the group's committed offsets reaching the end of every partition; then the
views are compared with the source. On 2 cores the curve shows the shape (and that splitting the
partitions loses nothing), not how far it scales.

``7-publish``: a pgbench backlog published by a daemon with change-log views of accounts,
tellers and branches on a ``type: kafka`` sink (transactional, slot confirmed after each Kafka
commit), timed from the slot going active to the backlog confirmed; against a raw
``confluent-kafka`` producer (idempotent, ``acks=all``, no transactions) sending the very same
messages, read back from the topics, to a scratch topic. The ratio is what decoding, deriving
and exactly-once cost on top of the produce calls themselves; it is reported without a target
(the daemon's side is scenario 1's slot drain plus one Kafka transaction per batch).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from . import pg
from .daemon import Daemon
from .pg import BenchError
from .report import Row
from .settings import Settings
from .scenarios import (ACCOUNTS, BRANCHES, TELLERS, Context, Names, bootstrap, drain, fresh_pgbench, redis_views,
                        scratch, step)
from .stores import clean_redis, redis_client

__all__ = ["scenario_7_publish", "scenario_7_workers", "UNITS"]



def _config(path: Path, *, dsn: str, slot: str, servers: str, prefix: str, names: Names) -> Path:
    views = {names.view(t): {"table": table, "sink": "log"}
             for t, table in (("accounts", ACCOUNTS), ("tellers", TELLERS), ("branches", BRANCHES))}
    doc = {"source": {"dsn": dsn, "slot": slot},
           "sinks": {"log": {"type": "kafka", "bootstrap_servers": servers, "topic_prefix": prefix,
                             "partitions": 3}},
           "views": views, "http": {"listen": "off"}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_stream_messages(servers: str, topics: list[str]) -> list[tuple[str, bytes | None, bytes]]:
    """The committed messages of ``topics`` that are not snapshot reads (op ``r``):
    ``(topic, key, value)``."""
    c = Consumer({"bootstrap.servers": servers, "group.id": f"bench-{time.time_ns()}",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "enable.partition.eof": True})
    out: list[tuple[str, bytes | None, bytes]] = []
    try:
        meta = c.list_topics(timeout=10)
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta.topics[t].partitions]
        c.assign(parts)
        left = {(tp.topic, tp.partition) for tp in parts}
        while left:
            msgs = c.consume(10_000, 10)
            if not msgs:
                raise BenchError(f"reading {topics} timed out")
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise BenchError(f"reading {m.topic()}: {err.str()}")
                    left.discard((m.topic() or "", m.partition() or 0))
                    continue
                value = m.value() or b""
                if b'"op":"r"' not in value[:12]:
                    out.append((m.topic() or "", m.key(), value))
    finally:
        c.close()
    return out


def raw_produce(servers: str, topic: str, messages: list[tuple[str, bytes | None, bytes]]) -> float:
    """Seconds a plain idempotent producer takes to send ``messages`` to ``topic`` and have
    every one acknowledged."""
    p = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                  "queue.buffering.max.messages": 500_000})
    t0 = time.monotonic()
    for _, key, value in messages:
        while True:
            try:
                p.produce(topic, value, key)
                break
            except BufferError:
                p.poll(0.05)
    left = p.flush(120)
    seconds = time.monotonic() - t0
    if left:
        raise BenchError(f"raw producer: {left} messages not acknowledged")
    return seconds


def _delete_topics(servers: str, prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": servers})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if topics:
        for f in admin.delete_topics(topics, operation_timeout=30).values():
            try:
                f.result(30)
            except Exception:  # noqa: BLE001 - best effort: a topic already gone
                pass


def scenario_7_publish(ctx: Context) -> None:
    """Backlog publish into Kafka vs a raw producer of the same messages (see the module docstring)."""
    s = ctx.settings
    servers = s.kafka
    with scratch(ctx, "s7k", []) as n:
        prefix = n.db
        _delete_topics(servers, prefix + ".")
        try:
            dsn = fresh_pgbench(ctx, n, s.scale)
            work = ctx.workdir("s7k")
            cfg = _config(work / "pgderive.yaml", dsn=dsn, slot=n.slot(), servers=servers, prefix=prefix, names=n)
            daemon = Daemon(s, cfg, dsn=dsn, slot=n.slot(), workdir=work, name="pgderive-kafka")
            boot_s = bootstrap(daemon)
            step(f"backlog: pgbench -c {s.clients} -j {s.jobs} -T {s.backlog_seconds}")
            bench = pg.pgbench_run(s, n.db, seconds=s.backlog_seconds)
            end = pg.marker_lsn(dsn)
            changes = 3 * bench.transactions + 1  # + the marker
            timing, stats = drain(daemon, end)
            step(f"pgderive → Kafka: {timing.streaming:.2f} s streaming, {timing.total:.2f} s from spawn")
            topics = [f"{prefix}.{t}" for t in (ACCOUNTS, TELLERS, BRANCHES)]
            msgs = read_stream_messages(servers, topics)
            if len(msgs) != changes:
                raise BenchError(f"the topics hold {len(msgs):,} change messages, expected {changes:,}"
                                 " (every committed change exactly once)")
            admin = AdminClient({"bootstrap.servers": servers})
            scratch_topic = f"{prefix}.raw"
            admin.create_topics([NewTopic(scratch_topic, 3, 1)])[scratch_topic].result(30)
            raw_s = raw_produce(servers, scratch_topic, msgs)
            step(f"raw producer: {raw_s:.2f} s for {len(msgs):,} messages")
            rate, raw_rate = changes / timing.streaming, len(msgs) / raw_s
            ratio = rate / raw_rate
            size = sum(len(v) for _, _, v in msgs) / len(msgs)
            ctx.add(Row("7", "backlog publish → Kafka (3 change-log views, transactional)", rate, "changes/s",
                        raw_rate, "raw confluent-kafka producer, same messages", ratio, "—", None,
                        note=f"{changes:,} changes from {bench.transactions:,} pgbench tx, every one in the topics"
                             f" exactly once (read back, read_committed); {size:.0f} bytes per message; pgderive "
                             f"{timing.streaming:.2f} s from the slot active to the backlog confirmed (WAL decoding,"
                             f" derivation, one Kafka transaction per batch) vs {raw_s:.2f} s of produce + flush; "
                             f"snapshot of {s.scale * 100_000 + s.scale * 10 + s.scale:,} rows published as op r in "
                             f"{boot_s:.1f} s; {timing.cpu_note()}",
                        extra={"changes": changes, "pgderive_s": timing.streaming, "raw_s": raw_s,
                               "bootstrap_s": boot_s, "bytes_per_message": size, "stats": stats}))
        finally:
            _delete_topics(servers, prefix + ".")


def _end_offsets(servers: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """The read_committed end (last stable offset) of every partition of ``topics``."""
    c = Consumer({"bootstrap.servers": servers, "group.id": f"bench-probe-{time.time_ns()}",
                  "isolation.level": "read_committed"})
    try:
        meta = c.list_topics(timeout=10)
        return {(t, p): c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in topics for p in meta.topics[t].partitions}
    finally:
        c.close()


def _committed(servers: str, group: str, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(t, p) for t, p in parts], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in got}
    finally:
        c.close()


def _worker_config(path: Path, *, dsn: str, servers: str, prefix: str, group: str, names: Names,
                   redis_url: str) -> Path:
    doc = {"source": {"dsn": dsn, "kafka": {"bootstrap_servers": servers, "group": group, "topic_prefix": prefix}},
           "sinks": {"cache": {"type": "redis", "url": redis_url}}, "views": redis_views(names),
           "http": {"listen": "off"}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _accounts_match(ctx: Context, dsn: str, names: Names) -> tuple[int, int]:
    """(accounts whose Redis record differs from Postgres or is missing, accounts checked)."""
    import psycopg
    r = redis_client(ctx.settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT aid, abalance FROM pgbench_accounts").fetchall()
    bad = 0
    pipe = r.pipeline(transaction=False)
    for aid, _ in rows:
        pipe.hget(f"{names.redis_prefix}account:{aid}", "abalance")
    for (aid, bal), got in zip(rows, pipe.execute()):
        if got is None or int(got) != bal:
            bad += 1
    return bad, len(rows)


def scenario_7_workers(ctx: Context) -> None:
    """1, 2 and 3 derivation workers on the same published log (see the module docstring)."""
    s = ctx.settings
    servers = s.kafka
    scale = 1 if s.quick else max(1, s.scale // 5)
    counts = (1, 2, 3)
    with scratch(ctx, "s7w", []) as n:
        prefix = n.db
        _delete_topics(servers, prefix + ".")
        groups: list[str] = []
        try:
            dsn = fresh_pgbench(ctx, n, scale)
            work = ctx.workdir("s7w")
            cfg = _config(work / "publisher.yaml", dsn=dsn, slot=n.slot(), servers=servers, prefix=prefix, names=n)
            publisher = Daemon(s, cfg, dsn=dsn, slot=n.slot(), workdir=work, name="publisher")
            bootstrap(publisher)
            step(f"backlog: pgbench -c {s.clients} -j {s.jobs} -T {s.backlog_seconds}")
            bench = pg.pgbench_run(s, n.db, seconds=s.backlog_seconds)
            end = pg.marker_lsn(dsn)
            drain(publisher, end)
            topics = [f"{prefix}.{t}" for t in (ACCOUNTS, TELLERS, BRANCHES)]
            ends = _end_offsets(servers, topics)
            messages = len(read_stream_messages(servers, topics)) + scale * 100_110
            step(f"published: {messages:,} messages (snapshot + {bench.transactions:,} pgbench tx)")
            curve: list[tuple[int, float]] = []
            cpus: list[float] = []
            for count in counts:
                wn = Names(s.prefix, f"s7w{count}")
                clean_redis(redis_client(s), wn.redis_prefix, [wn.view(v) for v in ("accounts", "tellers", "branches")])
                group = f"{prefix}-g{count}-{time.time_ns()}"
                groups.append(group)
                wcfg = _worker_config(work / f"worker{count}.yaml", dsn=dsn, servers=servers, prefix=prefix,
                                      group=group, names=wn, redis_url=s.redis_url)
                t0 = time.monotonic()
                procs = [subprocess.Popen([str(s.pgderive), "run", "-c", str(wcfg)],
                                          stdout=open(work / f"worker{count}-{i}.log", "wb"), stderr=subprocess.STDOUT)
                         for i in range(count)]
                try:
                    deadline = t0 + 600
                    while True:
                        done = _committed(servers, group, list(ends))
                        if all(done.get(k, -1) >= v for k, v in ends.items() if v > 0):
                            break
                        if any(p.poll() is not None for p in procs):
                            raise BenchError(f"a worker of {count} exited (see {work}/worker{count}-*.log)")
                        if time.monotonic() > deadline:
                            raise BenchError(f"{count} worker(s) did not finish in 600 s")
                        time.sleep(0.2)
                    seconds = time.monotonic() - t0
                    cpu = sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs)
                    rebalances = sum((work / f"worker{count}-{i}.log").read_text(errors="replace").count("assigned ")
                                     for i in range(count))
                finally:
                    for p in procs:
                        p.send_signal(signal.SIGTERM)
                    for p in procs:
                        try:
                            p.wait(30)
                        except subprocess.TimeoutExpired:
                            p.kill()
                bad, checked = _accounts_match(ctx, dsn, wn)
                if bad:
                    raise BenchError(f"{count} worker(s): {bad:,} of {checked:,} accounts differ from Postgres")
                curve.append((count, messages / seconds))
                cpus.append(cpu)
                step(f"{count} worker(s): {seconds:.2f} s, {messages / seconds:,.0f} messages/s, {cpu:.1f} CPU s,"
                     f" {rebalances} assignment(s); {checked:,} accounts equal to Postgres")
                clean_redis(redis_client(s), wn.redis_prefix, [wn.view(v) for v in ("accounts", "tellers", "branches")])
            base = curve[0][1]
            for count, rate in curve[1:]:
                ctx.add(Row("7", f"derivation workers from Kafka: {count} vs 1", rate, "messages/s", base,
                            "1 worker, same log", rate / base, "—", None,
                            note=f"{messages:,} messages (a scale-{scale} snapshot as op r and a {s.backlog_seconds} s"
                                 f" pgbench backlog) derived into 3 Redis views by a fresh consumer group of {count}"
                                 f" worker(s), timed from spawn (interpreter start, group join) to every partition"
                                 f" committed; accounts equal to Postgres after each run. Curve (workers: messages/s):"
                                 f" {', '.join(f'{c}: {r:,.0f}' for c, r in curve)}; workers' CPU seconds"
                                 f" {', '.join(f'{c:.1f}' for c in cpus)}; {os.cpu_count()} CPU(s) shared with"
                                 " Postgres, Kafka and Redis",
                            extra={"curve": curve, "messages": messages, "cpu_s": cpus}))
            ctx.shared["workers"] = curve
        finally:
            _delete_topics(servers, prefix + ".")
            admin = AdminClient({"bootstrap.servers": servers})
            if groups:
                for f in admin.delete_consumer_groups(groups).values():
                    try:
                        f.result(30)
                    except Exception:  # noqa: BLE001 - best effort: a group already gone
                        pass


#: Scenario 7's units, run after :data:`bench.scenarios.UNITS` (same shape).
UNITS: list[tuple[str, str, str, Callable[[Context], None], Callable[[Settings], bool]]] = [
    ("7-publish", "7", "Kafka publish", scenario_7_publish, lambda s: 7 in s.scenarios),
    ("7-workers", "7", "Kafka derivation workers", scenario_7_workers, lambda s: 7 in s.scenarios),
]
