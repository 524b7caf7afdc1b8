"""Same-run throughput: reduced models against the unreduced one (``docs/flops.md``, "Throughput and latency").

Every model gets the same input tensor, created once on the device; warm-up iterations are
discarded; each repetition times ``iters`` forwards of every model in turn (interleaved, so
drift in clock speed or load hits all models alike), synchronising before and after; the
result is the median images/s over repetitions and the speed-up against the first model.

:func:`benchmark_training` times the training step the same way: forward in training mode, the
loss, backward and an AdamW step (fp16 autocast with a gradient scaler, or bf16 autocast, when asked
for), each model with its own optimiser, on the same random images and labels.
"""
from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import VitrimError

__all__ = ["BenchResult", "ModelTiming", "benchmark", "benchmark_training", "cross_entropy_loss", "environment",
           "LossFn", "output_logits"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelTiming:
    name: str
    img_per_s: float            # median over repetitions
    img_per_s_min: float
    img_per_s_max: float
    ms_per_batch: float         # median latency of one forward of the whole batch
    speedup: float = 1.0        # against the first (reference) model
    gmacs: Optional[float] = None
    runs: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    batch_size: int
    precision: str
    device: str
    input_size: tuple[int, int, int]
    warmup: int
    repeats: int
    iters: int
    compiled: bool
    env: dict
    timings: list[ModelTiming]
    mode: str = "inference"     # or "train": forward, loss, backward, optimiser step

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = (f"{'training step' if self.mode == 'train' else 'inference'}, batch {self.batch_size}, {self.precision}, {self.device} ({self.env.get('device_name')}), "
                f"sdpa={'on' if self.env.get('fused_attn') else 'off'}, compile={'on' if self.compiled else 'off'}, "
                f"{self.repeats} reps x {self.iters} iters after {self.warmup} warm-up")
        ms = "ms/step" if self.mode == "train" else "ms/batch"
        lines = [head, f"{'model':<36} {'GMACs':>7} {'img/s':>9} {'(min-max)':>17} {ms:>9} {'speedup':>8}"]
        for t in self.timings:
            g = f"{t.gmacs:.3f}" if t.gmacs is not None else "-"
            lines.append(f"{t.name:<36} {g:>7} {t.img_per_s:>9.1f} {f'{t.img_per_s_min:.1f}-{t.img_per_s_max:.1f}':>17} "
                         f"{t.ms_per_batch:>9.2f} {t.speedup:>7.2f}x")
        return "\n".join(lines)


def environment(device: torch.device) -> dict:
    """What a result must be recorded with: device, versions, threads, kernel settings."""
    import timm
    from timm.layers import use_fused_attn

    env = {
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "fused_attn": bool(use_fused_attn()),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["driver"] = getattr(torch.cuda, "driver_version", lambda: None)() if hasattr(torch.cuda, "driver_version") else None
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def _check_settings(what: str, models: dict, batch_size: int, device: str | torch.device, precision: str,
                    warmup: int, repeats: int, iters: int) -> torch.device:
    """The settings every benchmark shares, checked before any model runs; returns the device."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if batch_size < 1 or repeats < 1 or iters < 1 or warmup < 0:
        raise ValueError("batch_size, repeats and iters must be >= 1 and warmup >= 0")
    if not models:
        raise ValueError(f"{what} needs at least one model")
    device = torch.device(device)
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 is not supported on this GPU; use fp16 or fp32")
    return device


def _time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                      iters: int, progress: Optional[Callable[[str], None]]) -> dict[str, list[float]]:
    """Seconds of ``iters`` calls of each entry, ``repeats`` times, the entries interleaved within each
    repetition (so drifting machine load hits them alike), after ``warmup`` untimed calls each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(repeats):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                call()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
        if progress is not None:
            progress(f"repetition {rep + 1}/{repeats}")
    return samples


def benchmark(
        models: dict[str, nn.Module],
        batch_size: int = 32,
        input_size: tuple[int, int, int] = (3, 224, 224),
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        warmup: int = 5,
        repeats: int = 5,
        iters: int = 5,
        compiled: bool = False,
        gmacs: Optional[dict[str, float]] = None,
        progress: Optional[Callable[[str], None]] = None,
) -> BenchResult:
    """Time ``models`` side by side; the first one is the reference for ``speedup``.

    Args:
        models: name -> model (already on ``device``, any reduction installed).
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast (weights stay fp32).
        warmup: untimed forwards per model before timing.
        repeats, iters: ``repeats`` timed samples of ``iters`` forwards each; median reported.
        progress: optional callback with a short status string per repetition.
    """
    device = _check_settings("benchmark", models, batch_size, device, precision, warmup, repeats, iters)
    x = torch.randn(batch_size, *input_size, device=device)
    for m in models.values():
        m.eval()
    with torch.inference_mode(), _autocast(device, precision):
        samples = _time_interleaved({name: (lambda m=m: m(x)) for name, m in models.items()},
                                    device, warmup, repeats, iters, progress)
    return BenchResult(batch_size, precision, str(device), tuple(input_size), warmup, repeats, iters,
                       compiled, environment(device), _timings(samples, batch_size, iters, gmacs))


def output_logits(out) -> torch.Tensor:
    """A classifier's output as one logits tensor: a tensor as it is, distilled heads in training mode
    (a pair) averaged, a Hugging Face output's ``logits``. Raises for an output without logits."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        return (out[0] + out[1]) / 2
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise VitrimError(f"a training step needs class logits, but the model returns {type(out).__name__} without "
                      f"them (a model without a classification head); accepted: classifiers, e.g. a timm model "
                      f"with a head or a Hugging Face ...ForImageClassification / ...ForVideoClassification / "
                      f"...ForAudioClassification")


def cross_entropy_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default training loss: cross-entropy of ``model(images)``'s logits."""
    return nn.functional.cross_entropy(output_logits(model(images)), targets)


def _timings(samples: dict[str, list[float]], batch_size: int, iters: int,
             gmacs: Optional[dict[str, float]]) -> list[ModelTiming]:
    timings = []
    for name, secs in samples.items():
        rates = [batch_size * iters / s for s in secs]
        timings.append(ModelTiming(
            name=name, img_per_s=statistics.median(rates), img_per_s_min=min(rates), img_per_s_max=max(rates),
            ms_per_batch=1000 * statistics.median(secs) / iters, runs=rates,
            gmacs=None if gmacs is None else gmacs.get(name),
        ))
    for t in timings:
        t.speedup = t.img_per_s / timings[0].img_per_s
    return timings


def benchmark_training(
        models: dict[str, nn.Module],
        batch_size: int = 32,
        input_size: tuple[int, ...] = (3, 224, 224),
        num_classes: int = 1000,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        warmup: int = 2,
        repeats: int = 5,
        iters: int = 2,
        compiled: bool = False,
        gmacs: Optional[dict[str, float]] = None,
        loss_fns: Optional[dict[str, LossFn]] = None,
        lr: float = 1e-6,
        progress: Optional[Callable[[str], None]] = None,
) -> BenchResult:
    """Time the training step of ``models`` side by side; the first one is the reference.

    One step: ``zero_grad``, forward and loss under autocast (``precision`` ``fp16`` / ``bf16``;
    fp16 with a ``GradScaler`` on CUDA), backward, AdamW step. Each model gets its own AdamW over its
    trainable parameters (created before warm-up, so its state allocation is not timed). The
    models' weights change (``lr`` is tiny, so their speed does not): benchmark copies.

    Args:
        loss_fns: name -> ``loss(model, images, targets)`` (default :func:`cross_entropy_loss`);
            reduced models pass their method's training terms here.
        input_size: one sample's shape (``(3, H, W)`` for images, ``(C, T, H, W)`` for video ...).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    device = _check_settings("benchmark_training", models, batch_size, device, precision, warmup, repeats, iters)
    loss_fns = loss_fns or {}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    use_scaler = device.type == "cuda" and precision == "fp16"
    steps = {}
    for name, m in models.items():
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"benchmark_training: model {name!r} has no parameter with requires_grad=True, so "
                              f"there is no training step to time; unfreeze some parameters or time inference "
                              f"with benchmark()")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        loss_fn = loss_fns.get(name, cross_entropy_loss)

        def step(m=m, opt=opt, scaler=scaler, loss_fn=loss_fn) -> None:
            opt.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                loss = loss_fn(m, x, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        steps[name] = step
    samples = _time_interleaved(steps, device, warmup, repeats, iters, progress)
    return BenchResult(batch_size, precision, str(device), tuple(input_size), warmup, repeats, iters,
                       compiled, environment(device), _timings(samples, batch_size, iters, gmacs), mode="train")
