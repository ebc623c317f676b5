"""fusedres benchmark suites (pytest-benchmark); see bench/README.md. Not part of ``pytest tests``."""
