"""The DVC pipeline: the stage table, the runner, one recipe per stage, artifacts and their records.

Lives here: ``stages`` (what each stage reads and writes), ``runner`` (arguments, params, logging,
launching ranks, outputs committed together, one-line errors), ``recipes/<stage>`` (each stage's
body: read inputs, call the library, write artifacts), ``inputs`` (the dense model, calibration and
held-out windows as the model stages load them), ``metrics`` (stage timings and metrics files),
``artifacts`` (staged outputs, tables with provenance, fingerprint checks), ``plots``, ``dvc_file``
(dvc.yaml generated from the stage table and the recipes' imports).

May import every package below it: the method packages (pruning, recovery, evaluation, export),
models, data, config, runtime, errors.
"""
