"""Stage artifacts: outputs replaced together, byte-stable tables, provenance checks.

Three rules (the first lives in :mod:`gqaprune.runtime.files`, shared with the library's writers):

* never write through an existing file (DVC links its cache into the workspace): atomic writes;
* a stage's outputs are replaced together or not at all (:func:`stage_outputs`): they are written to
  staged siblings and renamed into place only when the whole stage succeeded;
* equal content gives equal bytes: JSON and Parquet metadata are written with sorted keys, and no
  timing or date goes into an artifact that a later stage reads (timings are metrics).

Every table carries a ``gqaprune`` entry in its Parquet schema metadata (JSON): the model fingerprint,
the ids of the inputs it was made from and the params that produced it; readers check them
(:func:`check_made_from`, :func:`gqaprune.pipeline.inputs.check_inputs`) so scores of one model are
never applied to another.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from gqaprune.errors import GqapruneError, InputError
from gqaprune.runtime.files import atomic_path, json_safe, jsonable, remove_litter, remove_path

META_KEY = b"gqaprune"


class ArtifactMismatchError(GqapruneError, ValueError):
    """Two artifacts (or an artifact and a model) do not belong together."""


class StageOutputs:
    """The outputs of one stage run, staged next to their final places until the stage succeeds.

    ``outputs(path)`` gives where to write a declared output (or a file inside a declared output
    folder). :meth:`commit` checks that every declared output was produced, then replaces the old
    outputs by the new ones; :meth:`abort` drops the staged ones and leaves the old outputs as they
    were, so the outputs never disagree with each other.
    """

    def __init__(self, outputs: Sequence[str | Path], scratch: Path | None = None):
        self.outputs = [Path(p) for p in outputs]
        self.scratch = scratch
        if scratch is None:
            self.staged = {p: p.with_name(f".{p.name}.staged{os.getpid()}") for p in self.outputs}
        else:  # a rank that does not write: a private folder, dropped at the end
            self.staged = {p: scratch / f"{n}_{p.name}" for n, p in enumerate(self.outputs)}
        for out, tmp in self.staged.items():
            remove_path(tmp)
            if scratch is None:
                remove_litter(out)  # what a killed run of this stage left (its pid no longer runs)

    def __call__(self, path: str | Path) -> Path:
        """The staged location of ``path`` (a declared output or a path inside one)."""
        path = Path(path)
        for out, tmp in self.staged.items():
            if path == out:
                return tmp
            if out in path.parents:
                return tmp / path.relative_to(out)
        raise ValueError(f"{path} is not among this stage's outputs {[str(p) for p in self.outputs]}")

    def commit(self) -> None:
        """Replace every output by its staged version (all outputs must have been written)."""
        if self.scratch is not None:
            self.abort()
            return
        missing = [str(p) for p, tmp in self.staged.items() if not tmp.exists()]
        if missing:
            raise RuntimeError(f"the stage did not write its outputs {missing}")
        stops = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a stop now waits until every output is in
        try:
            for out, tmp in self.staged.items():
                remove_path(out)
                os.replace(tmp, out)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def abort(self) -> None:
        """Drop the staged outputs; the previous outputs stay as they were."""
        for tmp in self.staged.values():
            remove_path(tmp)
        if self.scratch is not None:
            remove_path(self.scratch)


@contextmanager
def stage_outputs(outputs: Sequence[str | Path], commit: bool = True) -> Iterator[StageOutputs]:
    """Stage ``outputs`` for the block; commit them together on success, drop them on any failure.

    ``commit=False`` (a rank other than the main one): whatever the block writes goes to a private
    temporary folder, removed afterwards; the outputs are left alone.
    """
    import tempfile

    staged = StageOutputs(outputs, None if commit else Path(tempfile.mkdtemp(prefix="gqaprune-rank-")))
    try:
        yield staged
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def write_table(path: str | Path, df: pd.DataFrame, meta: Mapping) -> None:
    """Write ``df`` as Parquet with ``meta`` (JSON, sorted keys) in the schema metadata, atomically.

    The bytes are a function of the content: the metadata is serialised with sorted keys and the
    writer's settings are fixed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    merged = {**(table.schema.metadata or {}),
              META_KEY: json.dumps(json_safe(dict(meta), what=str(path)), default=jsonable, sort_keys=True,
                                   allow_nan=False).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(merged), tmp, compression="snappy")


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    """Write ``df`` as CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a Parquet artifact and its ``gqaprune`` metadata."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact {path} does not exist; run the stage that writes it first")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise InputError(f"artifact {path} is not a readable Parquet file ({e}); re-run the stage that "
                         "writes it") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ArtifactMismatchError(f"{path} carries no gqaprune metadata: it was not written by this package")
    return table.to_pandas(), json.loads(raw)


def check_made_from(what: str, recorded, current, rerun: str, of: str = "input",
                    current_is: str = "the current one is") -> None:
    """Refuse an artifact (``what``) made from another ``of`` (``recorded`` id) than the ``current`` one.

    ``current_is`` says where the current id comes from (``"artifacts/model.json now holds"``); ``rerun``
    names the stage(s) that make ``what`` again.
    """
    if recorded != current:
        raise ArtifactMismatchError(f"{what} was made from the {of} {recorded}, but {current_is} {current}; "
                                    f"they do not belong together: re-run {rerun}")


def check_fingerprint(meta: Mapping, fingerprint: str, what: str) -> None:
    """Refuse an artifact whose recorded model fingerprint differs from ``fingerprint``."""
    recorded = meta.get("fingerprint")
    if recorded != fingerprint:
        raise ArtifactMismatchError(
            f"{what} was computed on model {recorded!r}, not on this model ({fingerprint!r}); "
            "re-run the stages that produce it for this model"
        )
