"""A new token-reduction method in one file, defined outside vitrim, used by every vitrim tool.

The method ("norm top-K", a simple baseline): after each block at ``locations``, keep the patch
tokens whose features have the largest L2 norm, ``ceil(keep_rate * n)`` of the current ``n``; the
others are dropped. It is registered with ``@vitrim.register_method`` and then runs through
``vitrim.apply``, ``vitrim.flops``, ``vitrim.solve``, ``vitrim.compare``, ``vitrim.visual.visualize``,
``vitrim.forward_dense`` and a one-epoch ``vitrim train`` on the embedded default model, with no
edit to vitrim itself.

    python examples/custom_method.py --output custom-method/

What a method provides is described in docs/architecture.md, "Adding a method".
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence, Union

import timm
import torch
from torch import nn

import vitrim
from vitrim import BlockTokens, ForwardState, ModelInfo, ReductionMethod, register_method
from vitrim.methods import parse_keep_rate, parse_locations
from vitrim.ops.prune import gather_tokens, keep_count_current, rank_tokens


@register_method
class NormTopK(ReductionMethod):
    """Norm top-K: after each location block, keep the patch tokens with the largest feature norm.

    Args:
        keep_rate: kept fraction of the current patch tokens at each location (or one per location).
        locations: 0-based blocks after which tokens are dropped.
    """

    name = "normtopk"
    strength = "keep_rate"       # what vitrim.solve and vitrim compare set
    sweep = (0.9, 0.7, 0.5)      # vitrim compare's default strengths
    color = "tab:olive"          # plots and pictures
    reduced_verb = "dropped"     # picture legends

    def __init__(self, info: ModelInfo, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Sequence[int] = (3, 6, 9)) -> None:
        super().__init__(info)
        self.locations = parse_locations(locations, info.depth)          # clear errors for bad values
        self.keep_rate, self._rates = parse_keep_rate(keep_rate, len(self.locations), cumulative=False)

    def _kept(self, index: int, n: int) -> int:
        return keep_count_current(n, self._rates[self.locations.index(index)])

    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        x = block(x)                                                      # the model's own block
        if index not in self.locations:
            return x, state
        p = state.num_prefix_tokens                                       # class / register tokens stay
        n = x.shape[1] - p
        k = self._kept(index, n)
        if k >= n:
            return x, state
        scores = x[:, p:].norm(dim=-1)                                    # [B, n]
        keep_index, _ = rank_tokens(scores, k)                            # [B, k], best first
        x = gather_tokens(x, keep_index, p)                               # [B, p + k, C]
        # a recorded stage is all dense features and pictures need
        state = self.record_stage(state, index, k, stage=self.locations.index(index) + 1,
                                  target=self._rates[self.locations.index(index)], index=keep_index, scores=scores)
        return x, state

    def plan_block(self, index: int, tokens_in: int, num_patches: int) -> BlockTokens:
        """The whole block runs on every token entering it; the drop happens after it."""
        out = tokens_in
        if index in self.locations:
            p = self.info.num_prefix_tokens
            out = p + self._kept(index, tokens_in - p)
        return BlockTokens(q=tokens_in, kv=tokens_in, mlp=tokens_in, out=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="custom-method", help="folder for the outputs (default: ./custom-method)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate compare on this many images only")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    print("registered methods:", ", ".join(vitrim.methods()))

    # apply, flops: the embedded default model (12 blocks, 64 patches + class token, trained on digits)
    model = vitrim.apply(timm.create_model("vitrim_vit_digits", pretrained=True).eval(), "normtopk", keep_rate=0.5)
    base_gmacs = vitrim.flops(timm.create_model("vitrim_vit_digits"))
    print(f"flops: {base_gmacs:.4f} GMACs unreduced, {vitrim.flops(model):.4f} with normtopk keep_rate=0.5")

    # solve: the keep rate that meets a budget, priced without touching the model
    budget = round(0.75 * base_gmacs, 4)
    print(f"solve: target {budget} GMACs ->", vitrim.solve(timm.create_model("vitrim_vit_digits"), "normtopk",
                                                          target_gmacs=budget))

    # compare: the new method next to a built-in one, on the digits validation split
    from vitrim.compare import compare, markdown_table

    result = compare(methods=["normtopk", "evit"], sweeps={"normtopk": [{"keep_rate": 0.7}, {"keep_rate": 0.5}],
                                                           "evit": [{"keep_rate": 0.5}]},
                     batch_sizes=[8], warmup=1, repeats=2, iters=1, max_images=args.max_images,
                     output=os.path.join(args.output, "compare"), progress=False)
    print(markdown_table(result))

    # visualize and dense features: both follow the stages the method recorded
    from vitrim.visual import load_image, visualize

    print("visualize:", visualize(model, os.path.join(args.output, "normtopk.png")))
    x, _ = load_image(model, None, "vitrim_vit_digits")
    with torch.no_grad():
        dense = vitrim.forward_dense(model, x)
    print("forward_dense:", tuple(dense.shape), "(one feature per patch of the 8 x 8 grid)")

    # one epoch of fine-tuning with distillation from the unreduced model, as `vitrim train` does
    from vitrim.train.data import ensure_digits
    from vitrim.train.engine import TrainConfig, train
    from vitrim.train.recipes import get_recipe

    row = train(TrainConfig(model="vitrim_vit_digits", data=str(ensure_digits()), output=os.path.join(args.output, "run"),
                            recipe=get_recipe("digits-finetune").replace(epochs=1, kd_weight=0.5), method="normtopk",
                            method_options={"keep_rate": 0.7}, pretrained=True, overwrite=True, workers=0,
                            progress=False))
    print(f"train: one epoch, val top-1 {row['val']['top1']:.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
