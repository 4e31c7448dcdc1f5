"""ccied.bench: the demo and the benchmarks behind ``ccied demo`` and ``ccied bench``."""
