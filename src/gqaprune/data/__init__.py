"""Data: corpus text from the local mirror or the hub, token windows, instruction records, task data.

Lives here: ``sources`` (rows of a corpus split, instruction records, the corpora snapshot),
``windows`` (the one tokenisation rule, calibration samples, held-out and training windows).

May import: :mod:`gqaprune.config`, :mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
