import pytest
import torch

from smalti.trainer import Trainer

from conftest import tiny_recipe
from helpers import losses, recipe

pytestmark = pytest.mark.slow


def test_torch_compile_trains_like_eager(tmp_path, tiny_corpus):
    torch._dynamo.reset()
    eager = tiny_recipe(tiny_corpus, train={"max_duration": "6ba"})
    compiled = tiny_recipe(tiny_corpus, train={"max_duration": "6ba", "compile": True})
    Trainer(recipe(eager), tmp_path / "eager").fit()
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer = Trainer(recipe(compiled), tmp_path / "compiled")
    assert isinstance(trainer.placement.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    trainer.fit()
    # the forward really ran through dynamo: graphs were captured and compiled, none fell back to eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 1
    trainer.close()
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
