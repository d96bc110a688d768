"""Data sets: reading and validating (read.py), ingest into dataset artifacts (ingest.py), the built-in tasks that
generate data offline with their gold scorers (demo.py with demo_world.py, arithmetic.py)."""
