"""The parts of ``benchmarks/gpu_8b.py``, by purpose.

* ``options``: the command line (defaults and ``--tiny`` values side by side);
* ``bench``: the recorder (JSON after every measurement, time budget), timing, environment;
* ``preset``: one preset's sections in order;
* ``floors``: matmul, forward, forward + backward;
* ``library``: importance scoring and similarity sweeps (and ``--baseline-dir`` copies), profile;
* ``hookbench``: scoring's gradient reduction on one layer;
* ``pruning``: plan, surgery, save;
* ``perplexity``: evaluation throughput;
* ``speed``: prefill, decode (CUDA graph and eager), decode profile, uniform-prune alignment.
"""
