"""Shared pytest fixtures: where the real services are (see scripts/services.sh), and
``scenario`` (a scratch database + YAML + daemon per test, :class:`tests.support.Scenario`)."""
from __future__ import annotations

import os

import pytest

from .support import Scenario

# Daemons the tests start serve no HTTP endpoint unless a test asks for one (``--http``,
# tests/integration/test_monitoring.py): dozens of them run at once and would race for
# 127.0.0.1:9187, each loser logging that the default address is taken.
os.environ.setdefault("PGDERIVE_HTTP", "off")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis URL; override with PGDERIVE_TEST_REDIS_URL."""
    return os.environ.get("PGDERIVE_TEST_REDIS_URL", "redis://127.0.0.1:6380/0")


@pytest.fixture(scope="session")
def opensearch_hosts() -> list[str]:
    """OpenSearch node URLs; override with PGDERIVE_TEST_OPENSEARCH_URL (one URL)."""
    return [os.environ.get("PGDERIVE_TEST_OPENSEARCH_URL", "http://127.0.0.1:9201")]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Kafka bootstrap servers (host:port[,...]); override with PGDERIVE_TEST_KAFKA."""
    return os.environ.get("PGDERIVE_TEST_KAFKA", "127.0.0.1:9093")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """Postgres admin DSN; override with PGDERIVE_TEST_PG_DSN."""
    return os.environ.get("PGDERIVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5433/postgres")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Kafka bootstrap servers (scripts/services.sh: a single KRaft node, PLAINTEXT, transactions
    enabled, 3 partitions by default); override with PGDERIVE_TEST_KAFKA."""
    return os.environ.get("PGDERIVE_TEST_KAFKA", "127.0.0.1:9093")


@pytest.fixture
def scenario(tmp_path):
    made: list[Scenario] = []

    def make(schema: str, views: str) -> Scenario:
        s = Scenario(tmp_path, schema, views)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()
