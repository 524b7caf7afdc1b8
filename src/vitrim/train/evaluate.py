"""Top-1 / top-5 and images/s of a model on an ImageFolder, with timm's eval transform."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..checks import resolve_device
from ..errors import VitrimError
from ..progress import Progress

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    top1: float
    top5: float
    images: int
    img_per_s: float
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False, progress: bool = False,
             desc: str = "eval", all_reduce: bool = False) -> EvalResult:
    """Single centre-crop accuracy.

    ``progress=True``: a bar on a terminal, a plain line at most every 10 s when standard error is a
    file or a pipe. ``all_reduce=True`` sums the counts over the process group: every rank must then call
    this with its own shard of the data. Leave it False when one rank evaluates the whole split.
    """
    device = resolve_device(device)  # a missing GPU is said here, not by the first tensor moved
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, n, loss sum
    seconds = 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16) \
        if amp else torch.autocast(device.type, enabled=False)
    total = len(loader) if hasattr(loader, "__len__") else None
    for images, targets in Progress(loader, total=total, desc=desc, enabled=progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            logits = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        logits = logits.float()
        if targets.numel() and int(targets.max()) >= logits.shape[-1]:
            raise VitrimError(f"the data has label {int(targets.max())} but the model has {logits.shape[-1]} outputs: "
                              f"its class folders are not the model's classes (check them first with "
                              f"vitrim.train.data.check_classes)")
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == targets[:, None]
        totals[0] += hit[:, 0].sum()
        totals[1] += hit.any(dim=-1).sum()
        totals[2] += targets.numel()
        totals[3] += nn.functional.cross_entropy(logits, targets, reduction="sum")
    if all_reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    if totals[2].item() == 0:
        raise VitrimError("nothing to evaluate: the data loader gave no images (an empty folder or split?)")
    n = max(totals[2].item(), 1)
    return EvalResult(top1=100 * totals[0].item() / n, top5=100 * totals[1].item() / n, images=int(totals[2].item()),
                      img_per_s=totals[2].item() / max(seconds, 1e-9), loss=totals[3].item() / n)
