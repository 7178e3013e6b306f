"""Massive activations at every projection's input, for the closing note of issue 22: per layer and
projection, the channel max of |x| over the first tokens of models/demo/heldout.txt (512; minilm: its
first 1,500 characters), the three channels standing furthest above the median channel max, and
those more than 20x above it. Dense models, no policy. Command:

    HF_HUB_OFFLINE=1 python -m bench.massive_activations > bench/results/massive_activations.txt
"""
import torch
from sam_viz.models import load_model
from sam_viz.sparse_ops.input_calibration import projection_modules

torch.set_num_threads(1)
TEXT = open("models/demo/heldout.txt").read()[:6000]
for spec in ("demo-lm", "demo-lm-dense", "minilm"):
    loaded = load_model(spec)
    mods = projection_modules(loaded)
    seen = {}
    hooks = []
    for layer, byname in enumerate(mods):
        for name, m in byname.items():
            def hook(mod, args, layer=layer, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs()
                seen[(layer, name)] = x.amax(0)
            hooks.append(m.register_forward_pre_hook(hook))
    enc = loaded.encode(TEXT[:1500] if spec == "minilm" else TEXT)
    enc = {k: v[:, :512] for k, v in enc.items()}
    with torch.no_grad():
        loaded.model(**enc)
    for h in hooks:
        h.remove()
    print(spec, "tokens", enc["input_ids"].shape[1])
    for (layer, name), mx in sorted(seen.items()):
        ratio = mx / mx.median()
        top = ratio.topk(3)
        big = (ratio > 20).nonzero().flatten().tolist()
        print(f"  L{layer} {name:5s} median max|x| {mx.median():.3g}; top channels {top.indices.tolist()} x{[round(v, 1) for v in top.values.tolist()]}; >20x: {big}")
