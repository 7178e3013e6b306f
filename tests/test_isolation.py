"""A run leaves nothing behind, and runs on one shared model do not see each other.

Modelled on captum's hook-removal tests: run normally, run with an error raised inside, then
assert that no hook is left on any module and that the model computes as shipped.
"""
import threading

import pytest
import torch
from torch.nn.modules import module as nn_module

from conftest import HELD_OUT, model_output, shared
from sam_viz import RunSpec, analyze
from sam_viz.sparse_ops import KERNELS, Policy, Recorder, current_run, sparsified

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")


def hook_snapshot(model):
    per_module = {name: tuple(len(getattr(mod, d)) for d in HOOK_DICTS) for name, mod in model.named_modules()}
    return per_module, tuple(len(getattr(nn_module, g)) for g in GLOBAL_HOOKS)


def _assert_clean(m, unpatched, enc, before):
    assert current_run() is None
    with torch.no_grad():
        assert torch.equal(model_output(m, enc), model_output(unpatched, enc))
    per_module, global_hooks = hook_snapshot(m.model)
    assert global_hooks == before[1] == (0, 0, 0, 0)
    assert all(counts == (0,) * len(HOOK_DICTS) for counts in per_module.values())


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-opt", "tiny-bert", "tiny-mixtral"])
def test_nothing_left_after_run_and_after_errors(spec, fresh):
    unpatched = fresh(spec)
    m = fresh(spec)
    enc = m.encode(HELD_OUT[1])
    before = hook_snapshot(m.model)

    with torch.no_grad(), sparsified(m, Policy("topk", 0.25), recorder=Recorder()):
        model_output(m, enc)
    _assert_clean(m, unpatched, enc, before)

    with pytest.raises(RuntimeError, match="raised in the block"):
        with sparsified(m, Policy("threshold", 0.5)):
            raise RuntimeError("raised in the block")
    _assert_clean(m, unpatched, enc, before)

    def exploding_kernel(x, idx, w):
        raise RuntimeError("raised inside the MLP")

    KERNELS["exploding"] = exploding_kernel
    try:
        with pytest.raises(RuntimeError, match="raised inside the MLP"):
            with torch.no_grad(), sparsified(m, Policy("topk", 0.5), kernel="exploding"):
                model_output(m, enc)
    finally:
        del KERNELS["exploding"]
    _assert_clean(m, unpatched, enc, before)


def _fingerprint(result):
    layers = [(l.ids.clone() if l.ids is not None else None, l.values.clone() if l.values is not None else None,
               l.selected.clone()) for l in result.layers]
    return layers, dict(result.compare)


def _same(a, b):
    (la, ca), (lb, cb) = a, b
    assert ca == cb
    for (ia, va, sa), (ib, vb, sb) in zip(la, lb):
        assert torch.equal(sa, sb)
        assert (ia is None and ib is None) or torch.equal(ia, ib)
        assert (va is None and vb is None) or torch.equal(va, vb)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-mixtral"])
def test_threads_with_different_policies_on_one_model(spec):
    m = shared(spec)
    specs = [RunSpec(prompt=HELD_OUT[2], model=spec, policy="topk", density=0.2),
             RunSpec(prompt=HELD_OUT[2], model=spec, policy="threshold", density=0.6),
             RunSpec(prompt=HELD_OUT[2], model=spec, policy="dense", density=1.0)]
    alone = [_fingerprint(analyze(m, s)) for s in specs]
    assert alone[0][1] != alone[1][1] != alone[2][1]       # the policies really differ

    rounds = 6
    barrier = threading.Barrier(len(specs))
    results = {i: [] for i in range(len(specs))}
    errors = []

    def worker(i):
        try:
            for _ in range(rounds):
                barrier.wait(timeout=60)
                results[i].append(_fingerprint(analyze(m, specs[i])))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for i in range(len(specs)):
        assert len(results[i]) == rounds
        for got in results[i]:
            _same(got, alone[i])
