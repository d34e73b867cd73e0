"""Crash anywhere: ``kill -9`` the daemon at random moments (bootstrap and streaming) during a
mixed workload, restart it each time, then every view must equal its source exactly.

The harness is :mod:`tests.chaos.harness`; this CI-sized run does 20+ kills in well under 3 minutes.
``make chaos`` runs the same test with a bigger workload and 100 kills (``PGDERIVE_CHAOS_*``
environment variables, see :mod:`tests.chaos.harness`). A failure prints the seed to reproduce it:
``PGDERIVE_CHAOS_SEED=<seed> pytest tests/chaos/test_chaos.py``.
"""
from __future__ import annotations

import pytest

from .harness import ChaosConfig, run_chaos

pytestmark = pytest.mark.slow


def test_kill9_anywhere_converges(capsys):
    cfg = ChaosConfig.from_env()
    run = run_chaos(cfg)
    with capsys.disabled():
        print(f"\nchaos seed={cfg.seed}: {len(run.kills)} kills "
              f"({run._kill_summary()}), {run.starts} starts, workload {run.workload.stats.summary()}")
    assert len(run.kills) >= cfg.kills
    assert sum(k.phase == "bootstrap" for k in run.kills) >= cfg.boot_kills
