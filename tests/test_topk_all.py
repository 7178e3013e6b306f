"""tools/topk_all.py, the training wrapper of demo-lm-all (issue 23): top-k on every projection's input
with a straight-through backward (Q-Sparse), against the equations written here by hand."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tools import topk_all

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept_by_hand(x: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the k entries of largest |x_i|, ties to the lower index, by sorting in Python."""
    return [sorted(range(len(row)), key=lambda i: (-abs(row[i].item()), i))[:k] for row in x]


@pytest.mark.parametrize("density,d_in", [(1.0, 12), (0.4, 12), (0.4, 10), (0.1, 30)])
def test_forward_keeps_the_k_largest_inputs(density, d_in):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, 7)
    wrapped = topk_all.TopKInput(lin)
    wrapped.density = density
    x = torch.randn(5, d_in)
    x[0, :4] = 0.5                                   # ties: the lower index wins
    k = max(1, round(density * d_in))
    want = torch.stack([sum((x[n, i] * lin.weight[:, i] for i in kept), torch.zeros(7)) + lin.bias
                        for n, kept in enumerate(_kept_by_hand(x, k))])
    with torch.no_grad():
        assert torch.allclose(wrapped(x), want, atol=1e-6)
        assert torch.allclose(wrapped(x.view(1, 5, d_in)), want.view(1, 5, 7), atol=1e-6)


def test_backward_is_straight_through_for_x_and_masked_for_w():
    """dL/dx = W^T dL/dy on every entry (dropped ones too); dL/dW = dL/dy x_kept^T."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(10, 4, bias=False)
    wrapped = topk_all.TopKInput(lin)
    wrapped.density = 0.3                              # k = 3
    x = torch.randn(2, 10, requires_grad=True)
    g = torch.randn(2, 4)
    (wrapped(x) * g).sum().backward()
    x_kept = torch.zeros(2, 10)
    for n, kept in enumerate(_kept_by_hand(x.detach(), 3)):
        x_kept[n, kept] = x.detach()[n, kept]
    assert torch.allclose(x.grad, g @ lin.weight.detach(), atol=1e-6)
    assert torch.allclose(lin.weight.grad, g.T @ x_kept, atol=1e-6)


def test_install_wraps_the_seven_projections_and_uninstall_restores_the_model():
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        wrappers = topk_all.install(model)
        assert len(wrappers) == 2 * 7
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)      # density 1: the model
        for w in wrappers:
            w.density = 0.5
        assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-3)
        topk_all.uninstall(model)
        assert torch.equal(model(input_ids=ids).logits, before)
    assert not any(isinstance(m, topk_all.TopKInput) for m in model.modules())


def test_keep_mask_equals_a_stable_sort_with_many_ties():
    torch.manual_seed(3)
    x = torch.randint(-3, 4, (50, 17)).float()                 # few distinct values: ties everywhere
    for k in (1, 5, 9, 16, 17):
        order = x.abs().sort(dim=-1, descending=True, stable=True).indices[:, :k]
        want = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(topk_all.keep_mask(x, k), want), k
