"""The parts every params section is built from: the error types, the rule helpers, the Section base.

A rule helper returns an error string (``section.key must be ..., got ...``) or None; a section's
``rules()`` lists them and :meth:`Section.errors` keeps the failing ones, so every problem of a file
is reported at once. Torch-free.
"""

from __future__ import annotations

import math
from typing import ClassVar

from gqaprune.config.corpora import calibration_corpora
from gqaprune.errors import GqapruneError


class ParamsError(GqapruneError, ValueError):
    """params.yaml (or a --set override) holds bad keys or values; the message lists all of them."""


class PlanError(ParamsError):
    """The plan's settings or inputs cannot produce a valid plan (unreachable target, bad key...)."""


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def rule(ok: bool, key: str, what: str, value) -> str | None:
    """``key must be what, got value`` when ``ok`` is false."""
    return None if ok else f"{key} must be {what}, got {value!r}"


def choice(value, options, key: str) -> str | None:
    """``key must be one of [...], got value`` when ``value`` is not among ``options``."""
    return rule(value in options, key, f"one of {list(options)}", value)


class Section:
    """Base of a params section: ``errors()`` lists every bad value; ``validate()`` raises them together."""

    section: ClassVar[str]
    error_class: ClassVar[type[ParamsError]] = ParamsError

    def rules(self) -> list[str | None]:
        """Range and choice checks of this section (None entries are passing checks)."""
        return []

    def errors(self) -> list[str]:
        """Every problem with this section's values, as ``section.key must be ..., got ...``."""
        return [e for e in self.rules() if e]

    def validate(self) -> None:
        """Raise ``error_class`` listing every problem (for configs built in Python, not from YAML)."""
        errors = self.errors()
        if errors:
            raise self.error_class("; ".join(errors))

    def key(self, name: str) -> str:
        """The dotted params key of a field."""
        return f"{self.section}.{name}"


def mix_rule(mix, key: str) -> str | None:
    """The check of a corpus mix: ``auto`` or ``{calibration corpus: weight > 0}``."""
    ok = mix == "auto" or (isinstance(mix, dict) and bool(mix) and all(
        k in calibration_corpora() and is_num(v) and v > 0 for k, v in mix.items()))
    return rule(ok, key, f"auto or a mapping of {calibration_corpora()} to weights > 0", mix)
