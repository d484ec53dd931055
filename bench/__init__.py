"""mcpd benchmarks: ``make bench`` (full) and ``make bench-quick`` (regression guard).

Entry point: ``python -m bench.run``. Everything measured is started here, on this machine:
a baseline upstream (:mod:`bench.upstream`), brokers (``tests.cluster.Broker``), publishers
(:mod:`bench.publisher`, and the ``mcpd-publish`` agent when it exists) and a load generator
(:mod:`bench.loadgen`), each in its own process.
"""
