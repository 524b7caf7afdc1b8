"""LV-ViT-S reduced by DynamicViT 0.7, dTPS (4, 8, 12) 0.5 and IdleViT 0.7 against the unreduced model.

    python benchmarks/lvvit.py                       # lvvit_s, batch 32, fp32, CPU
    python benchmarks/lvvit.py --device cuda --batch-size 256

One call to ``vitrim.measure.bench.benchmark``: the same input, warm-up, interleaved repetitions,
median images/s. Prints analytic GMACs (protocol convention), the FLOPs ratio and the measured
speed-up of each method; the check is speed-up >= FLOPs ratio. Weights are random (speed and FLOPs
do not depend on them).
"""
from __future__ import annotations

import timm

import vitrim  # noqa: F401  (registers the lvvit_* models)
from against_flops import parser, run

SETTINGS = {  # the papers' LV-ViT-S settings (locations and idle layers are vitrim's depth-rule defaults)
    "dynamicvit keep=0.7": ("dynamicvit", {"keep_rate": 0.7}),
    "dtps keep=0.5 loc=(4, 8, 12)": ("dtps", {"keep_rate": 0.5, "locations": (4, 8, 12)}),
    "idle keep=0.7": ("idle", {"keep_rate": 0.7}),
}

if __name__ == "__main__":
    args = parser(__doc__.split("\n\n")[0], model="lvvit_s", repeats=7).parse_args()
    raise SystemExit(run(args, timm.create_model, SETTINGS))
