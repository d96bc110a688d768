"""Reward functions: Python code that scores replies (exact answers, format checks, unit tests), beside or instead
of the learnt reward model. Not a stage: the RL stage and the eval stage use it.

- `config.py`: the `reward:` section of each RL method (`RewardSources`) and one function entry (`FunctionSpec`).
- `source_check.py`: what can be checked of a function without running it (file, syntax, name, signature); the
  driver never runs user code.
- `artifact.py`: a function's file as a content-addressed `reward-fn` artifact (its digest is in the cache key).
- `runner.py`: the Ray actor that imports and calls the functions, and the driver-side handle with timeouts and
  the checks of what they return.
- `builtin.py`: the built-in functions (exact match, math answers, a regex format check, the demo's gold scorer).

A function has TRL's signature: `fn(prompts, completions, **columns) -> list[float | None]`.
"""
