"""Where things live in shared storage: the one place that builds ``artifacts/...`` and ``runs/<id>/...`` paths.

Paths are relative to the storage root (``harness.storage.Storage``). Pure
functions, imported by both sides: training (worker side) names its artifact
directories here, and a run (``harness.run.Run``, driver side) names its
files here. See the README's *Storage* section for the tree.
"""

from __future__ import annotations

from typing import Protocol


class _Named(Protocol):
    scenario: str
    format: str
    environment: str


def artifact_dir(scenario: str, digest: str) -> str:
    """``artifacts/<scenario>/<digest>``: one format of one trained scenario, content-addressed."""
    return f"artifacts/{scenario}/{digest}"


def artifact_of_uri(uri: str | None) -> str | None:
    """The artifact directory (relative to the storage root) an ``artifact_uri`` column names, or None.

    Rows name the version a cell really replayed (``artifacts/<scenario>/<digest>/<version>``);
    readers go back to exactly that version, not to whatever the digest's pointer names now.
    """
    if not uri:
        return None
    path = uri.split("?", 1)[0].rstrip("/")
    at = path.rfind("/artifacts/")
    return path[at + 1:] if at >= 0 else (path if path.startswith("artifacts/") else None)


def run_root(run_id: str) -> str:
    """``runs/<run_id>``: everything a run publishes."""
    return f"runs/{run_id}"


#: A run's results and its journal segments, relative to its directory (``runs/<run_id>``).
RESULTS = "results.parquet"
JOURNAL = "journal"


def results_file(run_id: str) -> str:
    """``runs/<run_id>/results.parquet``: the run's results, published next to its observations."""
    return f"{run_root(run_id)}/{RESULTS}"


def journal_dir(run_id: str) -> str:
    """``runs/<run_id>/journal``: finished cells published while the run goes on, one JSON-lines segment
    per flush (``<time ns>-<random>.jsonl``, so names sort by time); removed once ``results.parquet`` is there."""
    return f"{run_root(run_id)}/{JOURNAL}"


def writable_probe(run_id: str) -> str:
    """A scratch file a run writes and deletes first, to find out whether it can use the storage."""
    return f"{run_root(run_id)}/.writable"


def observation_file(run_id: str, cell: _Named, group: str = "observations", repeat: int = 0) -> str:
    """``runs/<run_id>/<group>/<scenario>/<format>/<environment>.arrow``: a cell's outputs.

    ``group`` is ``observations`` for the sweep's cells and ``attribution`` for
    the variants ``harness explain`` runs. The first repeat of a cell writes
    that file; a later repeat ``r`` (0-based) writes ``<environment>.repeat-<r + 1>.arrow``
    beside it (``repeats: N`` in a sweep).
    """
    suffix = f".repeat-{repeat + 1}" if repeat else ""
    return f"{run_root(run_id)}/{group}/{cell.scenario}/{cell.format}/{cell.environment}{suffix}.arrow"


def explain_file(run_id: str, cell: _Named, part: str = "") -> str:
    """``runs/<run_id>/explain/<scenario>/<format>/<environment>[.<part>].arrow``: explain's layer files.

    No ``part``: the layer-by-layer comparison; ``training`` / ``cell``: the two traces it came from;
    ``float64``: the trace of the model rebuilt in float64 (the oracle's rebuild) they are judged against.
    """
    suffix = f".{part}" if part else ""
    return f"{run_root(run_id)}/explain/{cell.scenario}/{cell.format}/{cell.environment}{suffix}.arrow"
