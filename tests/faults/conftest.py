"""Fixtures of the fault scenarios: a ``Rig`` over the suite's Celery fixtures, and the scale.

``rig`` starts workers and beats of the example project against a ``SentinelTopology`` (through
``sentinel_worker``/``sentinel_beat``) or a ``RedisServer`` (``celery_worker``/``celery_beat``),
so that their logs are attached to a failing test's report and they are stopped at teardown.
``scale`` is ``benchmarks.fault_scenarios.DEFAULT_SCALE``, or ``FULL_SCALE`` with
``FAULTS_SCALE=full``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest

from benchmarks.fault_scenarios import Broker, Scale, scale_from_env
from example_project.devservers import CeleryProcess, SentinelTopology

Factory = Callable[..., CeleryProcess]


@dataclass
class FixtureRig:
    """A ``benchmarks.fault_scenarios.Rig`` made of the suite's process fixtures."""

    celery_worker: Factory
    celery_beat: Factory
    sentinel_worker: Factory
    sentinel_beat: Factory
    worker_env: Callable[..., dict[str, str]]
    sentinel_worker_env: Callable[..., dict[str, str]]

    def worker(self, broker: Broker, *, env: Mapping[str, str] | None = None,
               concurrency: int = 2) -> CeleryProcess:
        """A started worker using ``broker``."""
        start = (self.sentinel_worker if isinstance(broker, SentinelTopology)
                 else self.celery_worker)
        return start(broker, concurrency=concurrency, env=dict(env or {}))

    def beat(self, broker: Broker, *, env: Mapping[str, str] | None = None,
             extra_args: Sequence[str] = ()) -> CeleryProcess:
        """A started beat using ``broker``."""
        start = self.sentinel_beat if isinstance(broker, SentinelTopology) else self.celery_beat
        return start(broker, extra_args=extra_args, env=dict(env or {}))

    def environment(self, broker: Broker, **extra: str) -> dict[str, str]:
        """The environment of a subprocess using ``broker`` and the test database."""
        make = (self.sentinel_worker_env if isinstance(broker, SentinelTopology)
                else self.worker_env)
        return make(broker, **extra)


@pytest.fixture
def rig(celery_worker: Factory, celery_beat: Factory, sentinel_worker: Factory,
        sentinel_beat: Factory, worker_env: Callable[..., dict[str, str]],
        sentinel_worker_env: Callable[..., dict[str, str]]) -> FixtureRig:
    """Workers and beats against a topology or a server, stopped at teardown."""
    return FixtureRig(celery_worker, celery_beat, sentinel_worker, sentinel_beat, worker_env,
                      sentinel_worker_env)


@pytest.fixture(scope="session")
def scale() -> Scale:
    """The scale of the scenarios: small by default, ``FAULTS_SCALE=full`` for the full one."""
    return scale_from_env()
