"""Plumbing shared by the four stages: config base, artifact store, data, demo task, HF and Ray helpers."""
