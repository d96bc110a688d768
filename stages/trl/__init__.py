"""What the TRL stages (sft, reward, dpo) share: the driver half (`driver.py`: checks, loop config, Ray Train, publish),
the worker half (`worker.py`: model load, resume, train, save, report), the typed loop config both halves agree on
(`loop_config.py`), the tokenizer helpers (`tokens.py`), the preference-pair checks, and the demo task's held-out reply
scoring. Not a stage: it publishes nothing itself."""
