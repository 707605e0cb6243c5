"""The corpus registry: one record per corpus says where its splits live, how rows are read and joined.

A user adds a corpus by adding a :class:`Corpus` to :data:`CORPORA` (or calling :func:`register`);
nothing else in the toolkit tells corpora apart by name. Torch-free, so params validation can name
the known corpora without importing torch.

Local files are relative to a mirror directory laid out like the project's shared data folder;
the Hugging Face hub is the fallback when no local copy exists and the hub is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HubSource:
    """Where a corpus lives on the Hugging Face hub (``datasets.load_dataset`` arguments)."""

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None  # split -> file inside the dataset repo
    split_map: dict[str, str] = field(default_factory=dict)  # our split -> the hub's split name

    def label(self, split: str) -> str:
        """A readable name of the hub source of ``split``, for messages."""
        files = f" {self.data_files[self.hub_split(split)]}" if self.data_files else ""
        config = f"/{self.name}" if self.name else ""
        return f"{self.path}{config}{files} split {self.hub_split(split)!r}"

    def hub_split(self, split: str) -> str:
        """The hub's name of our split ``split``."""
        return self.split_map.get(split, split)


@dataclass(frozen=True)
class Corpus:
    """A corpus: its splits (each a tuple of candidate local files, the first existing one is read).

    ``rows`` says how a plain-text file (``.txt`` / ``.raw``) becomes rows: ``"wikitext"`` (one row
    per line, newline kept, whitespace-only lines as "", the HF wikitext rule) or ``"stripped"`` (one
    row per line, ``line.strip()``, the HF ptb rule); ``column`` names the text column of a
    JSON-lines / Parquet file (``"text"`` is tried when it is absent). ``halves`` cuts one document
    file into a calibration half and an evaluation half (the first ``halves`` documents, split at the
    middle).
    ``instructions`` marks an instruction-tuning corpus (records, not rows of text); its files are
    all read and concatenated. ``generator`` names the function that writes a corpus made from what is
    installed (no mirror file, no hub).
    """

    name: str
    splits: dict[str, tuple[str, ...]]
    rows: str = "stripped"
    column: str = "text"
    calibration_split: str | None = None
    evaluation_split: str | None = None
    halves: int | None = None
    instructions: bool = False
    hub: HubSource | None = None
    snapshot_splits: tuple[str, ...] | None = None  # splits copied by `prepare` (default: all)
    #: ``module:function`` that writes the corpus into a corpora folder when no mirror holds it (a corpus
    #: made from what is installed, e.g. the code corpus); returns the file it wrote
    generator: str | None = None
    #: instruction corpora: how many records are held out for evaluation (never calibrated or trained on;
    #: :func:`gqaprune.data.instructions.split_records`)
    heldout_records: int = 0

    def files(self, split: str) -> tuple[str, ...]:
        """Candidate local files of ``split`` (relative to the mirror); refuses unknown splits."""
        if split not in self.splits:
            raise ValueError(f"corpus {self.name!r} has no split {split!r}; splits: {list(self.splits)}")
        return self.splits[split]


CORPORA: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
    """Add (or replace) a corpus in the registry; returns it."""
    CORPORA[corpus.name] = corpus
    return corpus


register(Corpus(
    name="wikitext2",
    splits={"train": ("wikitext-2-raw/wiki.train.hf_rows.jsonl",),
            "validation": ("wikitext-2-raw/wiki.valid.hf_rows.jsonl", "wikitext-2-raw/wiki.valid.raw"),
            "test": ("wikitext-2-raw/wiki.test.hf_rows.jsonl", "wikitext-2-raw/wiki.test.raw")},
    rows="wikitext", calibration_split="validation", evaluation_split="test",
    hub=HubSource("wikitext", "wikitext-2-raw-v1"),
    snapshot_splits=("validation", "test"),  # no local train split: the test corpus is the point
))
register(Corpus(
    name="ptb",
    splits={"train": ("ptb/ptb.train.txt",), "validation": ("ptb/ptb.valid.txt",), "test": ("ptb/ptb.test.txt",)},
    rows="stripped", column="sentence", calibration_split="train", evaluation_split="test",
    hub=HubSource("ptb_text_only", "penn_treebank"),
))
_C4_FILES = ("c4/c4_validation_2k.parquet", "c4/c4_validation_2k.jsonl")
register(Corpus(
    name="c4",
    splits={"calibration": _C4_FILES, "validation": _C4_FILES},
    calibration_split="calibration", evaluation_split="validation", halves=2000,
    hub=HubSource("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                  split_map={"calibration": "validation"}),
))
register(Corpus(  # Python source of the standard library: origin and licence in gqaprune.data.code
    name="code",
    splits={"calibration": ("code/python_stdlib.jsonl",), "validation": ("code/python_stdlib.jsonl",)},
    calibration_split="calibration", evaluation_split="validation", halves=10_000,  # every module, cut in two
    generator="gqaprune.data.code:write_code_corpus",
))
register(Corpus(  # as calibration text: the training records rendered as the model sees them (chat template)
    name="alpaca",
    splits={"train": ("alpaca/alpaca_data_first200.json", "alpaca/alpaca_en_demo.json")},
    instructions=True, hub=HubSource("yahma/alpaca-cleaned"), calibration_split="train", heldout_records=100,
))


def get_corpus(name: str) -> Corpus:
    """A corpus by name; the error lists the known ones."""
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}") from None


def text_corpora() -> list[str]:
    """Names of the corpora of plain text (calibration / evaluation)."""
    return sorted(n for n, c in CORPORA.items() if not c.instructions)


def calibration_corpora() -> list[str]:
    """Names of the corpora that have a calibration split."""
    return sorted(n for n, c in CORPORA.items() if c.calibration_split)


def evaluation_corpora() -> list[str]:
    """Names of the corpora that have an evaluation split."""
    return sorted(n for n, c in CORPORA.items() if c.evaluation_split)


def instruction_corpora() -> list[str]:
    """Names of the instruction-tuning corpora."""
    return sorted(n for n, c in CORPORA.items() if c.instructions)
