"""Params: the schema of params.yaml (one dataclass per section), loading, validation, the allowed values.

Lives here: ``sections`` (the sections, their defaults = params.yaml's values), ``rules`` (the error
types, rule helpers, the Section base), ``loading`` (read, override, type-check, report every
problem at once), ``choices`` (every closed set of values a setting may take), ``corpora`` (the
catalogue of corpora a setting can name: files per split, row rules, split roles).

May import: :mod:`gqaprune.errors` only. Torch-free: stages parse params before anything heavy.
"""
