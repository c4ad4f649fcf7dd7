"""Benchmarks that ship with the package: ``fedkd bench defenses`` (``fedkd/bench/defenses.py``)."""
