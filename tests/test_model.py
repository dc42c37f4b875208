import pytest
import torch

from smalti.models.gpt import GPT, GPTConfig, alibi_causal_bias, alibi_slopes


@pytest.mark.parametrize("alibi", [False, True])
def test_causal_future_tokens_do_not_change_past_logits(alibi):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=16, alibi=alibi)).eval()
    x = torch.randint(0, 11, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 3) % 11
    a, b = model(x), model(y)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_tied_embeddings_and_names():
    model = GPT(GPTConfig(vocab_size=11, n_layer=2, n_head=2, d_model=16))
    assert model.head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "head.weight" not in names
    assert any(n.startswith("blocks.1.mlp.") for n in names)
    assert GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, d_model=16, alibi=True)).pos_emb is None


def test_alibi_slopes_and_bias():
    assert torch.allclose(alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    assert alibi_slopes(6).shape == (6,)
    bias = alibi_causal_bias(2, 3)
    assert bias[0, 2, 0].item() == pytest.approx(-2 * 2 ** -4)
    assert bias[1, 0, 1].item() == float("-inf") and bias[0, 1, 1].item() == 0.0


def test_rejects_too_long_input_and_bad_config():
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=5, n_head=3, d_model=8)


def test_generate_is_reproducible_with_a_seeded_generator():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, d_model=8)).eval()
    prompt = torch.tensor([[1, 2]])
    a = model.generate(prompt, 20, top_k=3, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 20, top_k=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 22) and torch.equal(a, b)
