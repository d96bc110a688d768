"""What the TRL stages (sft, reward, dpo) share: the Ray Train driver and worker around a TRL trainer, the
preference-pair checks, and the demo task's held-out reply scoring. Not a stage: it publishes nothing itself."""
