"""Stage ``source``: what ``prepare.model`` names, by content, so that DVC sees a source model change.

A local folder is outside the project, so DVC cannot track it; this stage runs at every ``dvc repro``
(``always_changed``) and writes ``artifacts/source.json``: the folder's resolved path and the size and
sha256 of each of its files (hashed again only where a file's size, mtime, ctime or inode moved, so an
unchanged 16 GB folder costs a ``stat`` per file), the embedded file's sha256, or a hub id and the
revision the hub serves. The file is byte-identical while the source is, so ``prepare`` (which depends
on it) re-runs exactly when the source's content changed. A source inside the pipeline's own outputs
is refused here, before any output is touched.
"""

from __future__ import annotations

import logging

from gqaprune.config.sections import Params
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import source_identity
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import SOURCE_INFO
from gqaprune.runtime.files import write_json

log = logging.getLogger("gqaprune")


def run(params: Params, out: StageOutputs, ctx=None) -> None:
    """Write artifacts/source.json for ``prepare.model``."""
    timer = Timer()
    identity = source_identity(params.prepare.model)
    write_json(out(SOURCE_INFO), identity, sort_keys=True)
    log.info("source %s: %s %s", params.prepare.model, identity["kind"],
             identity.get("digest") or identity.get("sha256") or identity.get("revision"))
    stage_metrics(out, "source", timer, {"kind": identity["kind"], "files": len(identity.get("files", {}))})
