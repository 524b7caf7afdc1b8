"""A RoPE ViT (timm ``Eva`` family, DINOv3-S at 224 px) reduced by ToMe r=13, EViT 0.7 and IdleViT 0.7
against the unreduced model.

    python benchmarks/rope.py                                   # vit_small_patch16_dinov3, batch 32, fp32, CPU
    python benchmarks/rope.py --model eva02_small_patch14_224.mim_in22k --device cuda --batch-size 256

One call to ``vitrim.measure.bench.benchmark`` (see ``against_flops.py``): the same input, warm-up,
interleaved repetitions, median images/s; the check is speed-up >= FLOPs ratio. ToMe recomputes the
rotation of merged tokens at their mean position (``position="mean"``, the default); EViT and IdleViT
gather the kept tokens' rope rows. Weights are random (speed and FLOPs do not depend on them).
"""
from __future__ import annotations

import timm

from against_flops import parser, run

SETTINGS = {
    "tome r=13": ("tome", {"r": 13}),
    "evit keep=0.7": ("evit", {"keep_rate": 0.7}),
    "idle keep=0.7": ("idle", {"keep_rate": 0.7}),
}

if __name__ == "__main__":
    args = parser(__doc__.split("\n\n")[0], model="vit_small_patch16_dinov3").parse_args()
    raise SystemExit(run(args, lambda name: timm.create_model(name, img_size=224), SETTINGS))
