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
    Trainer(recipe(compiled), tmp_path / "compiled").fit()
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
