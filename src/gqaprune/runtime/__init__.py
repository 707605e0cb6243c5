"""How the work runs: processes and ranks, devices and dtypes, where weights live, files, the hub.

Lives here: ``distributed`` (the rank context and its collectives), ``launch`` (a stage re-run under
torchrun; changes no result), ``placement`` (replicate or FSDP2-shard, reading any placement),
``devices`` (dtype names, 'auto' devices, memory), ``files`` (atomic writes, byte-stable JSON),
``hub`` (is the Hugging Face hub reachable).

May import: :mod:`gqaprune.config`, :mod:`gqaprune.errors`.
"""
