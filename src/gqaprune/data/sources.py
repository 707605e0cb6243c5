"""Where corpus text comes from: an explicit file, the local mirror, else the Hugging Face hub.

Corpora are records of the catalogue :mod:`gqaprune.config.corpora` (files per split, row rule, hub
source); nothing here branches on a corpus name.

Rows
----
* ``wikitext2``: the HF ``wikitext``/``wikitext-2-raw-v1`` ``text`` column: one row per raw line
  with its trailing ``"\\n"``, whitespace-only lines as ``""`` (test 4,358 rows, validation 3,760).
* ``ptb``: the HF ``ptb_text_only`` ``sentence`` column: each line of Mikolov's ``ptb.*.txt`` with
  ``.strip()`` (test 3,761 rows).
* ``c4``: the local mirror holds a 2,000-document subset of C4 ``en`` *validation*
  (``c4/c4_validation_2k.parquet`` or ``.jsonl``), cut deterministically into two disjoint halves in
  file order: ``calibration`` = documents ``[0, 1000)``, ``validation`` = ``[1000, 2000)``. From the
  hub the same rule is applied to the first 2,000 documents of
  ``en/c4-validation.00000-of-00008.json.gz`` (neither is the SparseGPT/Wanda C4 setup, so C4 numbers
  are for relative comparison only). A source with fewer than 2,000 documents is cut at ``n // 2``.
* instruction corpora (``alpaca``): records ``{"instruction", "input", "output"}``
  (:func:`load_instructions`).

Where the data comes from (first hit wins)
------------------------------------------
1. ``path``: an explicit local file. It is authoritative: if it does not exist,
   :class:`DataNotFoundError` is raised at once instead of silently using other data.
2. A local mirror directory: the ``data_dir`` argument, else ``$GQAPRUNE_DATA_DIR``. Its layout is
   that of the project's shared data folder.
3. The Hugging Face hub through :func:`datasets.load_dataset`, skipped at once when the hub is
   unreachable (:func:`gqaprune.runtime.hub.hub_reachable`).

If none works, :class:`DataNotFoundError` lists every place that was tried and why it failed. Local
files are read with the standard library and pyarrow, so a stage that reads a local corpus never
imports ``datasets``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gqaprune.config.corpora import Corpus, get_corpus, instruction_corpora
from gqaprune.errors import GqapruneError, InputError
from gqaprune.runtime.hub import hub_reachable

DATA_DIR_ENV = "GQAPRUNE_DATA_DIR"


class DataNotFoundError(GqapruneError, FileNotFoundError):
    """No source (explicit path, local mirror, Hugging Face hub) could provide the requested data."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the local mirror directory: ``data_dir`` if given, else ``$GQAPRUNE_DATA_DIR``, else None.

    The path is returned absolute (relative paths are taken relative to the current directory) but
    is not checked for existence.
    """
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return None if value is None else Path(value).expanduser().absolute()


def check_split(name: str, split: str) -> Corpus:
    """The corpus ``name``; refuses an unknown corpus or split."""
    corpus = get_corpus(name)
    corpus.files(split)  # refuses an unknown split
    return corpus


def _read_lines(file: Path, rule: str) -> list[str]:
    """Rows of a plain-text file: one per line, by the corpus' rule (see :class:`gqaprune.config.corpora.Corpus`)."""
    with open(file, encoding="utf-8") as f:  # iterate lines as the HF loaders do
        lines = list(f)
    if rule == "wikitext":  # newline kept, whitespace-only lines become ""
        return [line if line.strip() else "" for line in lines]
    return [line.strip() for line in lines]


def _read_column(file: Path, column: str) -> list[str]:
    """One text column of a Parquet or JSON-lines file (``text`` when ``column`` is absent)."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(file)
        names = table.column_names
        values = lambda col: table.column(col).to_pylist()  # noqa: E731
    else:
        records = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        names = list(records[0]) if records else [column]
        values = lambda col: [r.get(col) for r in records]  # noqa: E731
    if column not in names:
        if "text" not in names:
            raise InputError(f"{file} has no column {column!r} (columns: {names})")
        column = "text"
    return [str(x) if x is not None else "" for x in values(column)]


def _unreadable(file: Path, error: Exception) -> InputError:
    """A corpus or instruction file that cannot be decoded, named with the reason and the fix."""
    reason = " ".join(str(error).split())[:200]
    return InputError(f"corpus file {file} is damaged or not in its format ({type(error).__name__}: {reason}); "
                      "restore it from the data folder's source (see its README)")


def _read_local_rows(corpus: Corpus, file: Path) -> list[str]:
    """Rows of a corpus from one local file (format by suffix); refuses a file without text or not readable."""
    try:
        if file.suffix in (".txt", ".raw"):
            rows = _read_lines(file, corpus.rows)
        else:
            rows = _read_column(file, corpus.column)
    except InputError:
        raise
    except (ValueError, OSError, AttributeError) as e:  # JSON / UTF-8 / Parquet decoding (ArrowInvalid: ValueError)
        raise _unreadable(file, e) from None
    if not any(r.strip() for r in rows):
        raise InputError(f"corpus file {file} holds no text; restore it (see the data folder's README)")
    return rows


def _load_from_hub(name: str, split: str) -> list[str] | list[dict]:
    """Load a corpus split from the Hugging Face hub (needs network access; fails at once offline)."""
    corpus = get_corpus(name)
    if corpus.hub is None:
        raise ValueError(f"corpus {name!r} has no hub source")
    if not hub_reachable():
        raise ConnectionError("the hub is not reachable (offline, or HF_HUB_OFFLINE=1)")
    from datasets import load_dataset

    hub = corpus.hub
    kwargs = {"data_files": hub.data_files} if hub.data_files else {}
    ds = load_dataset(hub.path, hub.name, split=hub.hub_split(split), **kwargs)
    if corpus.instructions:
        return ds.to_list()
    if corpus.halves:
        ds = ds.select(range(min(corpus.halves, len(ds))))
    column = corpus.column if corpus.column in ds.column_names else "text"
    return list(ds[column])


def _half(corpus: Corpus, docs: list[str], split: str) -> list[str]:
    """For a corpus cut in halves: the calibration half or the evaluation half of its documents."""
    if not corpus.halves:
        return docs
    docs = docs[:corpus.halves]
    half = len(docs) // 2
    return docs[:half] if split == corpus.calibration_split else docs[half:]


def _not_found(what: str, looked: list[str]) -> DataNotFoundError:
    lines = "; ".join(f"({i}) {entry}" for i, entry in enumerate(looked, 1))
    return DataNotFoundError(
        f"could not load {what}; looked in: {lines}. "
        f"Pass path=..., or set data.data_dir / ${DATA_DIR_ENV} to a local mirror, or allow hub access."
    )


def _mirror(data_dir) -> tuple[Path | None, str]:
    """The mirror directory and how it was given (for messages)."""
    root = resolve_data_dir(data_dir)
    source = "data_dir argument" if data_dir is not None else f"${DATA_DIR_ENV}"
    return root, source


def load_rows(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
) -> list[str]:
    """Return the text rows of corpus ``name`` (e.g. ``wikitext2``, ``ptb``, ``c4``), split ``split``.

    Rows follow the HF datasets' row structure (see the module docstring). ``path`` is an explicit
    file for exactly this split (``.jsonl``/``.parquet`` with a text column, or ``.txt``/``.raw``
    lines); for a corpus cut in halves it is the whole document file and the half is cut from it.
    Otherwise the local mirror (``data_dir`` or ``$GQAPRUNE_DATA_DIR``) is tried, then the hub.

    Raises:
        ValueError: unknown corpus or split (or an instruction corpus: use :func:`load_instructions`).
        InputError: a local file exists but holds no text.
        DataNotFoundError: no source had the data; the message lists every place tried.
    """
    corpus = check_split(name, split)
    if corpus.instructions:
        raise ValueError(f"{name} holds instruction records; use load_instructions()")
    what = f"{name} split {split!r}"
    looked: list[str] = []

    if path is not None:
        file = Path(path).expanduser().absolute()
        if not file.is_file():
            raise _not_found(what, [f"explicit path {file}: no such file"])
        return _half(corpus, _read_local_rows(corpus, file), split)

    root, source = _mirror(data_dir)
    if root is None:
        looked.append(f"local mirror: none given (no data_dir argument, ${DATA_DIR_ENV} unset)")
    else:
        for rel in corpus.files(split):
            file = root / rel
            if file.is_file():
                return _half(corpus, _read_local_rows(corpus, file), split)
            reason = "no such file" if root.is_dir() else "the data directory does not exist"
            looked.append(f"local mirror ({source}) {file}: {reason}")

    if corpus.generator:  # a corpus made from what is installed: written to a scratch folder, then read
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gqaprune-corpus-") as tmp:
            return _half(corpus, _read_local_rows(corpus, Path(tmp) / _generate(corpus, tmp)), split)
    try:
        rows = _load_from_hub(name, split)
    except Exception as exc:  # offline, missing dataset, removed loader script, ...
        looked.append(f"Hugging Face hub {corpus.hub.label(split) if corpus.hub else name}: "
                      f"{type(exc).__name__}: {exc}")
        raise _not_found(what, looked) from exc
    return _half(corpus, rows, split)


def _generate(corpus: Corpus, out_dir) -> str:
    """Run the corpus' generator (``module:function``) into ``out_dir``; the file it wrote, relative to it."""
    import importlib

    module, _, function = corpus.generator.partition(":")
    return getattr(importlib.import_module(module), function)(out_dir)


def _normalise_record(rec: dict) -> dict:
    return {k: "" if rec.get(k) is None else str(rec.get(k)) for k in ("instruction", "input", "output")}


def _read_records(files: list[Path]) -> list[dict]:
    """Instruction records from JSON (a list) or JSON-lines files, concatenated in order."""
    records: list[dict] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
            if file.suffix == ".jsonl":
                found = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                found = json.loads(text) if text.strip() else []
            if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
                raise ValueError("expected a list of records {instruction, input, output}")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _unreadable(file, e) from None
        if not found:
            raise InputError(f"instruction file {file} holds no records; restore it")
        records += found
    return [_normalise_record(r) for r in records]


def load_instructions(
    name: str = "alpaca",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> list[dict]:
    """Return instruction records ``{"instruction", "input", "output"}`` (all ``str``).

    ``path`` is one JSON file (a list of records, or JSON lines) or a sequence of them, concatenated
    in the given order. Otherwise every local-mirror file of the corpus that exists, in registry
    order (for ``alpaca``: ``alpaca_data_first200.json`` then ``alpaca_en_demo.json``, 1,199 records
    with both), else the hub.

    Raises:
        ValueError: unknown corpus or split.
        DataNotFoundError: no source had the data; the message lists every place tried.
    """
    corpus = check_split(name, split)
    if not corpus.instructions:
        raise ValueError(f"unknown instruction corpus {name!r}; known: "
                         f"{instruction_corpora()}")
    what = f"{name} split {split!r}"

    if path is not None:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        files = [Path(p).expanduser().absolute() for p in paths]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise _not_found(what, [f"explicit path {f}: no such file" for f in missing])
        return _read_records(files)

    looked: list[str] = []
    root, _ = _mirror(data_dir)
    if root is None:
        looked.append(f"local mirror: none given (no data_dir argument, ${DATA_DIR_ENV} unset)")
    else:
        files = [root / rel for rel in corpus.files(split) if (root / rel).is_file()]
        if files:
            return _read_records(files)
        looked += [f"local mirror {root / rel}: no such file" for rel in corpus.files(split)]

    try:
        records = _load_from_hub(name, split)
    except Exception as exc:
        looked.append(f"Hugging Face hub {corpus.hub.label(split) if corpus.hub else name}: "
                      f"{type(exc).__name__}: {exc}")
        raise _not_found(what, looked) from exc
    return [_normalise_record(r) for r in records]


def snapshot_corpora(names: Sequence[str], out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
                     ) -> dict[str, list[str]]:
    """Write every split of the named corpora into ``out_dir`` in the local-mirror layout.

    The pipeline's ``prepare`` stage versions this folder with DVC, and later stages read it as their
    mirror, so a run is reproducible even when the source mirror or the hub changes. A split comes
    from the first of its candidate files that exists in the mirror (``data_dir`` /
    ``$GQAPRUNE_DATA_DIR``), copied as it is after checking that it holds text; a corpus with a
    split missing there is fetched from the hub and written in the mirror layout. ``out_dir`` must
    be a fresh folder (the caller stages it and renames it into place, so no file that may be a
    DVC cache link is ever written through). Returns ``{corpus: [files written, relative]}``.
    """
    import shutil

    out = Path(out_dir)
    root, _ = _mirror(data_dir)
    written: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):  # unique, in order
        corpus = get_corpus(name)
        splits = corpus.snapshot_splits or tuple(corpus.splits)
        if corpus.generator and not any(root is not None and (root / r).is_file()
                                        for split in splits for r in corpus.files(split)):
            written[name] = [_generate(corpus, out)]  # made from what is installed: no mirror, no hub
            continue
        if corpus.instructions:  # every instruction file that exists, concatenated when read
            found = [rel for rel in corpus.files(splits[0]) if root is not None and (root / rel).is_file()]
            if found:
                _read_records([root / rel for rel in found])
            else:
                _check_hub_can_stand_in(name, splits[0], root)
        else:
            found = []
            for split in splits:
                rel = next((r for r in corpus.files(split) if root is not None and (root / r).is_file()), None)
                if rel is None:
                    _check_hub_can_stand_in(name, split, root)
                    found = []
                    break
                if rel not in found:
                    _read_local_rows(corpus, root / rel)  # refuses an empty file before anything is written
                    found.append(rel)
        if found:
            for rel in found:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, out / rel)
        else:
            found = _write_from_hub(corpus, out)
        written[name] = found
    return written


def _check_hub_can_stand_in(name: str, split: str, root: Path | None) -> None:
    """Refuse, naming the missing file and its split, a corpus split the mirror lacks while the hub is unreachable."""
    if root is None or not root.is_dir() or hub_reachable():
        return
    wanted = " or ".join(str(root / rel) for rel in get_corpus(name).files(split))
    raise InputError(f"corpus {name}, split {split!r}: {wanted} does not exist and the Hugging Face hub is not "
                     "reachable; restore the file in the data folder (data.data_dir) or allow hub access")


def _write_from_hub(corpus: Corpus, out: Path) -> list[str]:
    """Fetch a corpus from the hub and write it in the local-mirror layout; returns the files written."""
    splits = corpus.snapshot_splits or tuple(corpus.splits)
    if corpus.instructions:
        rel = corpus.files(splits[0])[0]
        target = (out / rel).with_suffix(".jsonl")
        target.parent.mkdir(parents=True, exist_ok=True)
        records = load_instructions(corpus.name, splits[0], data_dir=None)
        target.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return [str(target.relative_to(out))]
    written = []
    if corpus.halves:  # both halves in one document file, in order
        docs = []
        for split in (corpus.calibration_split, corpus.evaluation_split):
            docs += load_rows(corpus.name, split, data_dir=None)
        rel = next(r for r in corpus.files(splits[0]) if r.endswith(".jsonl"))
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        return [rel]
    for split in splits:
        rel, rows = corpus.files(split)[0], load_rows(corpus.name, split, data_dir=None)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith((".txt", ".raw")):
            (out / rel).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        else:
            (out / rel).write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
        written.append(rel)
    return written
