from pathlib import Path

import pytest

from smalti.config import load_recipe, parse_override
from smalti.errors import RecipeError

from conftest import REPO, tiny_recipe, write_recipe


def test_shipped_recipes_are_valid():
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        data = recipe.data
        if data.images:  # a bundled image task: only its taxonomy (if governed) to locate
            assert recipe.model.name in ("resnet", "diffusion"), path
            assert all(p.is_absolute() for p in (data.taxonomy, data.trust) if p is not None), path
            continue
        located = [data.corpus] if data.corpus else [Path(data.url), data.taxonomy, data.trust]
        assert all(p.is_absolute() for p in located), path


def test_paths_are_relative_to_the_recipe_and_overrides_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = write_recipe(tmp_path / "sub" / "r.yaml", {"data": {"corpus": "../corpus"}})
    assert load_recipe(path).data.corpus == tmp_path / "corpus"
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path, ["data.corpus=elsewhere"]).data.corpus == tmp_path / "elsewhere"


def test_overrides_are_typed_yaml(tmp_path, tiny_corpus):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_corpus))
    recipe = load_recipe(path, ["train.max_duration=3ep", "optimizer.lr=1e-4", "optimizer.betas=[0.8, 0.9]",
                                "train.compile=true", "algorithms.ema={half_life: 10ba}"])
    assert recipe.train.max_duration == "3ep" and recipe.optimizer.lr == 1e-4
    assert recipe.optimizer.betas == (0.8, 0.9) and recipe.train.compile is True
    assert recipe.algorithms == {"ema": {"half_life": "10ba"}}
    assert parse_override("a.b=") == ("a.b", "")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"trian": {}}, r"unknown key 'trian' \(did you mean 'train'\?\)"),
        ({"train": {"max_duraton": "3ba"}}, r"unknown key 'train.max_duraton' \(did you mean 'train.max_duration'\?\)"),
        ({"train": {"max_duration": "3 bananas"}}, r"'train.max_duration': invalid time '3 bananas'"),
        ({"train": {"max_duration": "0.5dur"}}, r"max_duration cannot be in 'dur'"),
        ({"optimizer": {"name": "adam"}}, r"'optimizer.name'"),
        ({"optimizer": {"lr": -1}}, r"'optimizer.lr'"),
        ({"model": {"d_model": 30, "n_head": 4}}, r"not divisible"),
        ({"algorithms": {"mixupp": {}}}, r"unknown algorithm 'algorithms.mixupp'"),
        ({"algorithms": {"ema": {"half_lfe": "3ba"}}}, r"unknown key 'algorithms.ema.half_lfe'"),
        ({"algorithms": {"label_smoothing": {"smoothing": 2}}}, r"'algorithms.label_smoothing.smoothing'"),
        (["not", "a", "mapping"], r"must be a mapping"),
    ],
)
def test_bad_recipes_give_one_line_naming_file_and_key(tmp_path, data, message):
    path = write_recipe(tmp_path / "bad.yaml", data)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_bad_override_and_bad_yaml(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {})
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.max_duration"])
    with pytest.raises(RecipeError, match=r"^--set train.nope=1: unknown key 'train.nope'"):
        load_recipe(path, ["train.nope=1"])
    with pytest.raises(RecipeError, match=r"^--set train.max_duration=3x: 'train.max_duration': invalid time"):
        load_recipe(path, ["optimizer.lr=0.1", "train.max_duration=3x"])
    with pytest.raises(RecipeError, match=r"^--set train=\{max_duration: 2x\}: 'train.max_duration'"):
        load_recipe(path, ["train={max_duration: 2x}"])  # a whole section set at once is blamed too
    bad_file = write_recipe(tmp_path / "bad.yaml", {"train": {"max_duration": "3x"}})
    with pytest.raises(RecipeError, match=r"bad.yaml: 'train.max_duration'"):  # the file's own mistake names the file
        load_recipe(bad_file, ["optimizer.lr=0.1"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {max_duration: [\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: not valid YAML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(Path(tmp_path / "missing.yaml"))


def test_fingerprint_ignores_only_listed_keys(tmp_path, tiny_corpus):
    base = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_recipe(tiny_corpus)))
    longer = load_recipe(write_recipe(tmp_path / "b.yaml", tiny_recipe(tiny_corpus, train={"max_duration": "99ba"})))
    assert base.fingerprint() != longer.fingerprint()
    assert base.fingerprint(ignore=("train.max_duration",)) == longer.fingerprint(ignore=("train.max_duration",))


def test_the_default_shard_cache_is_in_the_home_folder_not_a_folder_named_tilde():
    """The unvalidated default stayed Path('~/...'): runs wrote a literal ./~/.cache in the working directory."""
    from smalti.config import Recipe

    cache = Recipe.model_validate({}).data.cache_dir
    assert cache == Path.home() / ".cache" / "smalti" / "shards" and "~" not in cache.parts
