"""ToMe on a small Hugging Face VideoMAE (16 frames) at the r that halves its GMACs, against the unreduced
model.

    python benchmarks/video.py                      # VideoMAE-S-like, 16 frames at 112 px, batch 4, fp32, CPU
    python benchmarks/video.py --image-size 224 --device cuda --batch-size 32

The model is ``VideoMAEForVideoClassification`` from a config (random weights: speed and FLOPs do not
depend on them): ViT-S widths (384, 6 heads, 12 layers), tubelets of 2 x 16 x 16, so 16 frames give
8 x (size / 16)^2 space-time tokens and no class token. ``vitrim.solve`` picks the constant r whose
analytic GMACs are nearest half the unreduced model's; timing as in ``against_flops.py``.
"""
from __future__ import annotations

import torch
from against_flops import parser, run

import vitrim


def build(args):
    import transformers

    def videomae(_name):
        cfg = transformers.VideoMAEConfig(image_size=args.image_size, patch_size=16, num_frames=args.frames,
                                          tubelet_size=2, hidden_size=384, num_hidden_layers=12,
                                          num_attention_heads=6, intermediate_size=1536, num_labels=400,
                                          attn_implementation="sdpa")
        return transformers.VideoMAEForVideoClassification(cfg)
    return videomae


if __name__ == "__main__":
    p = parser(__doc__.split("\n\n")[0], model="videomae-s", batch_size=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    args = p.parse_args()
    videomae = build(args)
    with torch.device("meta"):  # the analytic count needs the architecture only
        shape = videomae(args.model)
    full = vitrim.flops(shape)
    options = vitrim.solve(shape, "tome", target_gmacs=full / 2)
    print(f"{args.model}: {full:.3f} GMACs unreduced; ToMe {options} for {full / 2:.3f} (half)")
    raise SystemExit(run(args, videomae, {f"tome r={options['r']}": ("tome", options)}))
