"""Fixtures of the RL tests that run the stage for real."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A tiny SFT model, the same weights as a 1-label reward model, and the demo prompts, in one store."""
    import tempfile

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.common.store import ArtifactStore
    from stages.data import demo
    from tests.tiny_models import publish_rows, publish_tiny_base_model

    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    data = demo.generate(demo.DemoConfig(size="tiny"))
    sft = publish_tiny_base_model(store, [r["text"] for r in data["corpus"]["train"][:1500]], name="sft-model")
    with tempfile.TemporaryDirectory() as d:
        AutoModelForSequenceClassification.from_pretrained(sft.path, num_labels=1).save_pretrained(d)
        AutoTokenizer.from_pretrained(sft.path).save_pretrained(d)
        rm = store.publish(d, name="reward-model", kind="reward-model", stage="tests")
    prompts = publish_rows(store, "prompts", data["prompts"]["train"], data["prompts"]["test"], fmt="prompts",
                           task="demo")  # fmt: skip
    return {"store": store, "sft": sft, "rm": rm, "prompts": prompts}
