"""Plumbing every stage shares: the config base, the artifact store, HF, Ray Train, LoRA, sampling and forwards."""
