"""A code corpus that exists offline: Python source of the interpreter's own standard library.

Origin and licence: the ``.py`` files of the standard library of the Python that runs the toolkit
(CPython, Python Software Foundation License Version 2, a permissive licence), read from
``sysconfig.get_paths()["stdlib"]``. A fixed, sorted list of pure-Python modules is taken (algorithms,
text and data handling, parsing: code that reads like what users ask a code model to write); tests,
packages' ``__init__`` glue and generated files are not. No HumanEval text is in it.

Each module is one document (``{"text", "module", "python"}``). The ``prepare`` stage writes the
documents into the corpora snapshot (``code/python_stdlib.jsonl``), which DVC versions: later stages and
runs read the snapshot, so a run is reproducible from there even on another Python; the Python
version the text came from is recorded in every document. The corpus is cut like C4: the first half
of the documents is the calibration split, the second half the evaluation split.
"""

from __future__ import annotations

import json
import platform
import sysconfig
from pathlib import Path

from gqaprune.config.corpora import get_corpus
from gqaprune.errors import InputError

#: file of the snapshot, relative to the corpora folder (the catalogue's entry for the corpus ``code``)
CODE_FILE = get_corpus("code").splits["calibration"][0]

#: pure-Python standard-library modules, in a fixed order (the first half calibrates, the second evaluates)
MODULES = (
    "heapq", "bisect", "fractions", "statistics", "textwrap", "difflib", "string", "shlex", "fnmatch", "glob",
    "graphlib", "colorsys", "calendar", "pprint", "reprlib", "copy", "dataclasses", "enum", "functools",
    "contextlib", "abc", "numbers", "operator", "queue", "sched", "ipaddress", "base64", "quopri", "csv",
    "configparser", "argparse", "gettext", "tokenize", "ast", "inspect", "typing", "weakref", "random",
    "secrets", "uuid", "hmac", "zipfile", "tarfile", "posixpath", "ntpath", "datetime", "_pydecimal", "shutil",
    "tempfile", "json/decoder", "json/encoder", "json/scanner", "urllib/parse", "html/parser", "email/utils",
    "logging/__init__", "collections/__init__", "unittest/case", "doctest", "dis", "trace", "cmd", "code",
    "codeop", "filecmp", "netrc", "mailbox", "plistlib", "wave", "chunk", "locale", "selectors", "timeit",
    "tabnanny", "stringprep", "keyword", "linecache", "token", "traceback", "warnings", "optparse",
)


def code_documents() -> list[dict]:
    """The documents of the code corpus, in :data:`MODULES` order (modules absent from this Python are
    skipped; at least 40 must be found)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in MODULES:
        file = root / f"{name}.py"
        if file.is_file():
            docs.append({"text": file.read_text(encoding="utf-8"), "module": name,
                         "python": platform.python_version()})
    if len(docs) < 40:
        raise InputError(f"the code corpus found only {len(docs)} standard-library modules under {root}; this "
                         "Python's standard library is incomplete: give the code corpus as a file in data.data_dir "
                         f"({CODE_FILE})")
    return docs


def write_code_corpus(out_dir: str | Path) -> str:
    """Write the code corpus into the corpora folder ``out_dir`` (a fresh, staged folder); returns its file,
    relative to the folder."""
    target = Path(out_dir) / CODE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in code_documents()), encoding="utf-8")
    return CODE_FILE
