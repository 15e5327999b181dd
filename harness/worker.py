"""What an environment's long-lived worker does, as a plain class (no Ray inside).

The engine wraps :class:`Worker` in a Ray actor started with the environment's
``runtime_env`` (its import-time variables set before Python starts), so
TensorFlow is imported and configured once per worker, in :meth:`Worker.warm`,
and every cell of the environment is then served by the same process.
``--inline`` and tests can use the class directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .compare import Tolerance
from .records import ArtifactRecord, CellResult, TrainRecord
from .scenario import Scenario
from .spec import Environment


@dataclass(frozen=True)
class TrainJob:
    """Train one scenario and save it in every format of the sweep."""

    scenario: str
    formats: tuple[str, ...]
    batch_size: int
    retrain: bool = False


@dataclass(frozen=True)
class ReplayJob:
    """Reload one artifact in this worker's environment and compare it (one cell)."""

    scenario: str
    format: str
    environment: str
    artifact: ArtifactRecord
    batch_size: int
    tolerance: Tolerance = Tolerance()
    output_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    observation_path: str | None = None

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.format}/{self.environment}"


class Worker:
    """Serves the jobs of one environment in one process.

    Args:
        environment: the environment this process was started for.
        scenarios: every scenario its jobs may name, by name.
        storage_uri: the shared storage root (already resolved by the driver).
    """

    def __init__(self, environment: Environment, scenarios: Mapping[str, Scenario], storage_uri: str):
        self.environment = environment
        self.scenarios = dict(scenarios)
        self.storage_uri = storage_uri

    def warm(self) -> dict[str, Any]:
        """Import TensorFlow and apply the environment's process-wide settings, once.

        A setting this process cannot honour (no GPU, wrong import-time
        variables) is not raised here: every job then returns an ``error``
        verdict saying why, which is what the user needs to see per cell.
        """
        from . import fingerprint, runtime

        start = time.time()
        try:
            runtime.configure(self.environment)
        except runtime.EnvironmentMismatch:
            pass  # reported by each job
        info = fingerprint.ray_info()
        return {"pid": os.getpid(), "node_id": info.get("ray_node_id"), "seconds": time.time() - start}

    def train(self, job: TrainJob) -> TrainRecord:
        from .train import train

        return train(self.scenarios[job.scenario], list(job.formats), self.storage_uri, self.environment,
                     batch_size=job.batch_size, retrain=job.retrain)

    def replay(self, job: ReplayJob) -> CellResult:
        from .replay import replay

        art = job.artifact
        return replay(self.scenarios[job.scenario], job.format, art.path, self.storage_uri, self.environment,
                      batch_size=job.batch_size, tolerance=job.tolerance, output_tolerances=job.output_tolerances,
                      observation_path=job.observation_path, manifest_sha256=art.manifest_sha256)
