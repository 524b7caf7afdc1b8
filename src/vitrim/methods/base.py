"""The method contract: what every reduction method provides, and the registry ``vitrim.apply`` reads.

A method is an ``nn.Module`` attached to the model as ``model.vitrim``. Everything the rest of
vitrim needs from a method is asked of its class or instance, never looked up by its name:

* **options**: keyword arguments of ``__init__`` after ``info``, validated there;
* **forward**: :meth:`ReductionMethod.block_forward` runs one block (handed in by the adapter with
  its extra inputs already bound, see ``vitrim.adapters.base``) and returns the new state;
* **accounting**: :meth:`ReductionMethod.plan_block` gives the rows one block computes (FLOPs,
  budgets); :meth:`ReductionMethod.extra_macs` what the method adds outside the blocks;
* **strength**: :attr:`ReductionMethod.strength` names the option budgets and sweeps set;
  :meth:`strength_grid` / :meth:`default_sweep` its values (an option's default is the method's
  own, the same in the API, the CLI and every tool: ToMe's ``r`` defaults to the middle of its sweep);
* **training**: :attr:`loss_weights` (the weights its paper gives its terms), :meth:`loss_terms`,
  :meth:`begin_training` and :meth:`training_step` (e.g. EViT's keep-rate warm-up);
* **provenance**: :meth:`provenance` (what to keep for one forward), :meth:`patch_owners` (dense
  features), :meth:`token_maps` (pictures), with defaults that follow any stage recorded by
  :meth:`record_stage`.

Parameter-free methods (ToMe) add nothing to the state dict; learned ones (predictors) get stable
names under ``vitrim.``. A method never holds references to the model's modules.
See ``docs/architecture.md``, "Adding a method".
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import OptionError, UnsupportedModelError, VitrimError
from ..ops.prune import PruneRecord, gather_tokens
from ..ops.provenance import stage_patch_owners, stage_rows
from ..state import ForwardState

__all__ = ["ModelInfo", "HeadParts", "BlockTokens", "TokenMap", "ReductionMethod", "register_method", "get_method_class",
           "method_names", "registered_methods", "is_int", "is_real", "parse_option_value", "KEEP_RATE_GRID"]

#: keep rates a budget searches, weakest first (1.00, 0.99, ..., 0.01)
KEEP_RATE_GRID = tuple(round(0.01 * i, 2) for i in range(100, 0, -1))


def is_int(v: Any) -> bool:
    """An integer option value (Python or NumPy; ``bool`` is not one)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def is_real(v: Any) -> bool:
    """An integer or real option value (Python or NumPy; ``bool`` is not one)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def parse_option_value(text: str) -> Any:
    """An option value written as text: a Python literal (``13``, ``0.7``, ``(16, -1)``, ``[3, 6]``),
    ``true`` / ``false`` in any case, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model it is applied to: facts the adapter verified.

    ``depth`` counts every block (all stages of a pyramid); ``embed_dim`` / ``num_heads`` are the
    last stage's for pyramids. ``num_patches`` is the first stage's token count at the model's
    default input size.
    """

    family: str
    depth: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    num_patches: int
    global_pool: str
    has_class_token: bool = True      # class token at index 0 (class-attention scoring needs its query)
    stage_depths: tuple[int, ...] = ()  # blocks per stage of a pyramid model; () for a plain sequence
    stage_dims: tuple[int, ...] = ()
    needs_all_tokens: bool = False    # blocks need every token in place (pyramid stages: complete H x W maps)
    has_token_head: bool = False      # a classifier on every patch token besides the class head (LV-ViT's aux_head)
    needs_all_tokens_why: str = ""    # the family's reason, said when a token-removing method is refused
    windowed: bool = False            # blocks attend within fixed windows and hand their own window idle forms (Swin)
    family_label: str = ""            # human-readable family name for messages ("PVT-v2")
    weighted_attention_pool: bool = False  # an attention-pool head ("map") that takes pool_weights as log biases

    def stage_of(self, block: int) -> int:
        """Stage of a 0-based block index (0 for plain sequence models)."""
        end = 0
        for s, d in enumerate(self.stage_depths):
            end += d
            if block < end:
                return s
        return 0


@dataclass(frozen=True)
class HeadParts:
    """The parts of a model's head on its final tokens, for losses that read them separately
    (from the adapter's ``head_parts``; LV-ViT's DynamicViT loss).

    Attributes:
        class_logits: ``[B, K]`` the classifier alone: LV-ViT's ``head(cls)`` without the aux max;
            the model's output on families with no per-token head.
        token_logits: ``[B, N, K]`` the per-token head on every non-prefix token present (LV-ViT's
            ``aux_head``; in a masked training form, dead positions included), or ``None`` where the
            family has none (``ModelInfo.has_token_head``).
    """

    class_logits: torch.Tensor
    token_logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class BlockTokens:
    """Rows one block computes with, for analytic FLOPs.

    ``q``: query rows (and the attention output projection); ``kv``: key/value rows; ``mlp``:
    rows through the MLP; ``extra_macs``: method-specific matmuls counted by its rules; ``out``:
    tokens leaving the block when that differs from ``mlp`` (idle tokens pass a block without
    its MLP; a method may prune after the MLP).
    """

    q: int
    kv: int
    mlp: int
    extra_macs: int = 0
    out: Optional[int] = None

    @property
    def tokens_out(self) -> int:
        return self.mlp if self.out is None else self.out


@dataclass
class TokenMap:
    """One picture of a forward's provenance on the patch grid (what ``vitrim visualize`` draws).

    ``groups``: ``[h, w]`` group id per patch (patches with the same id are one token), or ``None``.
    ``state``: ``[h, w]`` 0 = active, 1 = reduced at this block (pruned, squeezed, fused or idle),
    2 = reduced at an earlier block; ``None`` when nothing is tinted.
    """

    title: str
    groups: Optional[np.ndarray] = None
    state: Optional[np.ndarray] = None
    block: Optional[int] = None  # the 0-based block the map shows the tokens after (None: the input)


_REGISTRY: dict[str, type["ReductionMethod"]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type["ReductionMethod"]) -> type["ReductionMethod"]:
    """Class decorator: make ``cls`` available to ``vitrim.apply`` (and every tool) under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, ReductionMethod)):
        raise TypeError(f"register_method decorates ReductionMethod subclasses, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str) or cls.name != cls.name.lower() or " " in cls.name:
        raise TypeError(f"{cls.__name__}.name must be a non-empty lower-case name without spaces, got {cls.name!r}")
    if cls.name == "none":
        raise TypeError("'none' is reserved for the unreduced model")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def registered_methods() -> list[type["ReductionMethod"]]:
    """Every registered method class in display order (``order``, then name): tables and sweeps list them so."""
    return sorted(_REGISTRY.values(), key=lambda cls: (cls.order, cls.name))


def get_method_class(name: str) -> type["ReductionMethod"]:
    if not isinstance(name, str):
        raise OptionError(f"method must be a name (str), got {type(name).__name__}; accepted: {', '.join(method_names())}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise OptionError(f"unknown method {name!r}; accepted: {', '.join(method_names())}"
                          + (f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else ""))
    return _REGISTRY[key]


class ReductionMethod(nn.Module):
    """Base class of a token-reduction method (see the module docstring for the whole contract).

    Subclasses set :attr:`name`, take their options as keyword arguments of ``__init__`` after
    ``info`` (validated there, so every option error surfaces at ``apply`` time), and implement
    :meth:`block_forward` and :meth:`plan_block`. Everything else has a default.
    """

    #: registry name (lower case)
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: one line for ``vitrim methods`` (default: the first line of the class docstring)
    summary: ClassVar[str] = ""
    #: position in tables and default sweeps (lower first; ties by name)
    order: ClassVar[int] = 100
    #: model pooling types the method can keep correct (``""`` = no pooling / raw tokens; ``"map"``: an
    #: attention-pool head, whose keys the adapter weights by :meth:`pool_weights`)
    supported_pools: ClassVar[tuple[str, ...]] = ("token", "avg", "avgmax", "max", "map", "")
    #: False for methods that keep every token in place (they can reduce pyramid models)
    removes_tokens: ClassVar[bool] = True
    #: ``pool_weights`` can be non-uniform (token sizes, keep masks): average pooling needs them
    pools_with_weights: ClassVar[bool] = False
    #: the option a budget (``vitrim.solve``) and a sweep (``vitrim compare``) set, or None
    strength: ClassVar[Optional[str]] = None
    #: the strengths ``vitrim compare`` sweeps by default (weakest first)
    sweep: ClassVar[tuple] = ()
    #: matplotlib colour of the method in plots and pictures (None: one from the default cycle)
    color: ClassVar[Optional[str]] = None
    #: what happens to a reduced token, in picture legends ("pruned", "fused", "squeezed", ...)
    reduced_verb: ClassVar[str] = "pruned"
    #: weights of the training terms by the method's rules, e.g. ``{"kd": 0.5, "ratio": 2.0}``
    #: (``kd``: logit distillation from the unreduced teacher, computed for every method)
    loss_weights: ClassVar[Mapping[str, float]] = {}
    #: the method's own terms (of :meth:`loss_terms`) that read the teacher's tokens
    teacher_terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, info: ModelInfo) -> None:
        super().__init__()
        self.info = info

    # ----------------------------------------------------------------- description
    @classmethod
    def describe(cls) -> str:
        """One line: what the method does (``summary``, else the first line of the class docstring)."""
        if cls.summary:
            return cls.summary
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0].rstrip(".") if doc else cls.__name__

    @classmethod
    def check_model(cls, info: ModelInfo) -> None:
        """Raise a clear error if the method cannot reduce a model with these facts (before any work)."""
        pools = cls.supported_pools + (("map",) if info.weighted_attention_pool else ())
        if info.global_pool not in pools:
            raise OptionError(f"method {cls.name!r} cannot keep pooling {info.global_pool!r} correct; "
                              f"accepted pooling: {', '.join(repr(p) for p in pools)}")
        if info.needs_all_tokens and cls.removes_tokens:
            idling = [n for n in method_names() if not _REGISTRY[n].removes_tokens]
            label = info.family_label or info.family
            if info.needs_all_tokens_why:
                raise UnsupportedModelError(
                    f"method {cls.name!r} cannot reduce a {label}: it removes or merges tokens, but "
                    f"{info.needs_all_tokens_why}; accepted on {label}: {', '.join(idling)}")
            raise UnsupportedModelError(
                f"method {cls.name!r} cannot reduce a pyramid model ({label} stages need every token in "
                f"place); accepted on {label}: methods that idle tokens instead of removing them "
                f"({', '.join(idling)})")

    # ----------------------------------------------------------------- options
    @classmethod
    def option_names(cls) -> list[str]:
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    @classmethod
    def create(cls, info: ModelInfo, **options: Any) -> "ReductionMethod":
        cls.check_option_names(options)
        return cls(info, **options)

    @classmethod
    def check_option_names(cls, options: dict[str, Any]) -> None:
        """Raise :class:`OptionError` naming the accepted options if ``options`` has others."""
        accepted = cls.option_names()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(unknown)} for method {cls.name!r}; "
                              f"accepted: {', '.join(accepted) or 'none'}")

    def options(self) -> dict[str, Any]:
        """Current option values (what ``apply`` would need to rebuild this method)."""
        return {name: getattr(self, name) for name in self.option_names()}

    def update(self, **options: Any) -> None:
        """Change options between forwards without re-applying (validated like ``apply``).

        The method is built anew from its options and takes every plain attribute of the new one
        (options and whatever ``__init__`` derived from them); its parameters and submodules stay.
        """
        fresh = type(self).create(self.info, **{**self.options(), **options})
        module_state = set(nn.Module().__dict__)
        for name, value in fresh.__dict__.items():
            if name not in module_state:
                self.__dict__[name] = value

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())

    # ----------------------------------------------------------------- strength
    @classmethod
    def strength_grid(cls, info: ModelInfo) -> list[Any]:
        """Values of :attr:`strength` a budget searches on a model, weakest reduction first."""
        if cls.strength == "keep_rate":
            return list(KEEP_RATE_GRID)
        return []

    @classmethod
    def default_sweep(cls, info: ModelInfo) -> list[dict]:
        """The settings ``vitrim compare`` measures by default on a model, weakest first."""
        if cls.strength is None or not cls.sweep:
            return [{}]
        return [{cls.strength: v} for v in cls.sweep]

    # ----------------------------------------------------------------- forward
    def new_state(self, x: torch.Tensor) -> ForwardState:
        """The state of one forward, from the tokens entering block 0 (``x: [B, T0, C]``)."""
        k = self.info.num_prefix_tokens
        return ForwardState(num_prefix_tokens=k, num_patches=x.shape[1] - k)

    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        """Run block ``index`` on ``x: [B, T, C]``; return the tokens leaving it and the new state.

        ``block(x)`` is the block's own forward (extra inputs bound by the adapter); its parts
        (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``)
        are the model's own modules (the block contract: ``vitrim.adapters.base``).
        """
        raise NotImplementedError

    @staticmethod
    def rebind(block: Any, state: ForwardState) -> Any:
        """``block`` bound to the tokens ``state`` describes, for a method that moves tokens *before*
        calling the block (families whose blocks need per-token inputs, e.g. rope rows, rebind them
        through the block's ``at(state)``; for the others ``block`` itself)."""
        at = getattr(block, "at", None)
        return at(state) if callable(at) else block

    def finish(self, state: ForwardState) -> None:
        """Called once after the last block (e.g. to expose provenance to the user)."""

    def extensions(self) -> list[str]:
        """Rules this method applies on this model that are not from its paper (``[vitrim extension]``,
        e.g. scoring without a class token); ``vitrim compare`` lists them under its report."""
        return []

    def pool_weights(self, state: ForwardState) -> Optional[torch.Tensor]:
        """``[B, T, 1]`` what each final token stands for (``None``: one token each): the weights of average
        pooling, and of an attention pool's keys (``+ log(w)`` on its logits)."""
        return state.size

    # ----------------------------------------------------------------- accounting
    def plan_block(self, index: int, tokens_in: int, num_patches: int) -> BlockTokens:
        """Rows block ``index`` computes when ``tokens_in`` tokens (prefix included) enter it.

        ``num_patches`` is the reference patch count of the forward (``N0`` of the input; a
        pyramid stage's ``H * W``), for rules that count against it.
        """
        raise NotImplementedError

    def block_tokens(self, num_tokens: int) -> list[BlockTokens]:
        """Per-block plan for an input of ``num_tokens`` tokens (prefix included), block to block."""
        n0 = num_tokens - self.info.num_prefix_tokens
        out, t = [], num_tokens
        for i in range(self.info.depth):
            plan = self.plan_block(i, t, n0)
            out.append(plan)
            t = plan.tokens_out
        return out

    def extra_macs(self, num_tokens: int) -> int:
        """Method-level MACs outside the blocks that its rules count (e.g. predictors)."""
        return 0

    def final_tokens(self, num_tokens: int) -> int:
        return self.block_tokens(num_tokens)[-1].tokens_out

    # ----------------------------------------------------------------- training
    def loss_terms(self, state: ForwardState, tokens: torch.Tensor, teacher_tokens: Optional[torch.Tensor],
                   weights: Mapping[str, float], recipe: Any, *, heads: Optional[HeadParts] = None,
                   teacher_heads: Optional[HeadParts] = None) -> dict[str, torch.Tensor]:
        """The method's weighted training terms on top of cross-entropy and ``kd``.

        Args:
            state: the student forward's state (masked training forms record what losses need).
            tokens: ``[B, T, C]`` the student's final (post-norm) tokens.
            teacher_tokens: ``[B, T0, C]`` the frozen unreduced teacher's, or ``None`` when no
                term that needs them has a weight.
            weights: every term's weight (the recipe's override, else :attr:`loss_weights`).
            recipe: the training recipe (read-only), for method settings such as IdleViT's
                ``cut_loss_layers`` and the loss targets (``token_target``, ``feature_target``,
                ``feature_norm``; ``docs/training.md``, "Loss targets").
            heads, teacher_heads: the student's and the teacher's :class:`HeadParts` (from the
                model's adapter) when the recipe's targets read them, else ``None``.
        """
        return {}

    def begin_training(self, recipe: Any) -> None:
        """Called once before training starts: check that the recipe fits the method (clear errors)."""

    def training_step(self, iteration: int, iters_per_epoch: int, recipe: Any) -> None:
        """Called before every training step (global iteration, 0-based), e.g. for a schedule."""

    def keep_at_rates(self) -> bool:
        """Make untrained learned keep decisions keep the method's rates, as trained ones do on average.

        For timing a training step: a freshly initialised predictor keeps a share of the tokens that
        its training would soon move (DynamicViT's keeps about half at every stage). Returns whether
        anything was changed; a method without learned decisions changes nothing.
        """
        return False

    # ----------------------------------------------------------------- provenance
    @contextlib.contextmanager
    def provenance(self) -> Iterator[None]:
        """Keep what :meth:`patch_owners` and :meth:`token_maps` need for the forwards inside."""
        yield

    def record_stage(self, state: ForwardState, block: int, kept: int, *, stage: int = 1, target: float = 1.0,
                     index: Optional[torch.Tensor] = None, scores: Optional[torch.Tensor] = None,
                     keep: Optional[torch.Tensor] = None, extra_positions: int = 0,
                     rest: Optional[torch.Tensor] = None, hosts: Optional[torch.Tensor] = None,
                     absorbs: bool = False) -> ForwardState:
        """Append a :class:`~vitrim.ops.prune.PruneRecord` for a stage that kept ``kept`` patch tokens.

        In gather form (``index: [B, kept]`` rows kept among the patch tokens entering the stage),
        the original patch position of every patch token leaving it is derived from the previous
        stages, with ``extra_positions`` non-patch tokens (``-1``) appended after the kept ones.
        Dense features and pictures follow such records with no method-specific code.
        """
        positions = None
        if index is not None:
            last = next((r.positions for r in reversed(state.records)
                         if isinstance(r, PruneRecord) and r.positions is not None), None)
            if last is None:
                last = torch.arange(state.num_patches, device=index.device).expand(index.shape[0], -1)
            positions = gather_tokens(last, index)
            if extra_positions:
                positions = torch.cat([positions, positions.new_full((index.shape[0], extra_positions), -1)], dim=1)
        rec = PruneRecord(method=self.name, block=block, stage=stage, target=target, kept=kept, keep=keep,
                          index=index, positions=positions, scores=scores, rest=rest, hosts=hosts, absorbs=absorbs)
        return state.add_record(rec)

    def patch_owners(self, state: ForwardState, num_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
        """Row of the final tokens that carries each original patch (dense features): ``[B, N0]``
        (or ``[1, N0]`` when nothing moved) indices into the ``num_tokens`` final rows.

        Default: follow the stages recorded with :meth:`record_stage`
        (:func:`~vitrim.ops.provenance.stage_patch_owners`: kept rows, squeezed rows to their hosts,
        every pruned row to a fused token, a dropped patch to the nearest surviving one).
        """
        return stage_patch_owners(state, num_tokens, grid)

    def token_maps(self, run: Callable[[], ForwardState], grid: tuple[int, int],
                   layers: Optional[Sequence[int]] = None) -> list[TokenMap]:
        """Pictures of what the method did to one image, one per recorded stage (or per ``layers``).

        ``run()`` performs one eval-mode forward of the reduced model on the image and returns its
        state. Default: one map per gather stage recorded by :meth:`record_stage` (tokens reduced at
        this block, and at earlier ones; squeezed patches grouped with their host).
        """
        state = run()
        n0 = grid[0] * grid[1]
        alive = np.ones(n0, dtype=bool)
        maps = []
        for rec in [r for r in state.records if isinstance(r, PruneRecord)]:
            if rec.positions is None:
                raise VitrimError("the pruning records hold no positions (masked training form); pictures need "
                                  "the model in eval mode")
            pos = rec.positions[0].cpu().numpy()
            now = np.zeros(n0, dtype=bool)
            now[pos[pos >= 0]] = True
            status = np.where(now, 0, np.where(alive, 1, 2))
            groups = None
            if rec.hosts is not None:  # each squeezed patch joins its host's group
                entering = np.flatnonzero(alive)
                rows = stage_rows(rec, len(entering))[0].cpu().numpy()
                groups = np.arange(n0)
                groups[entering] = np.where(rows >= 0, n0 + rows, entering)
            alive = now
            if layers is None or rec.block in layers:
                maps.append(TokenMap(f"block {rec.block}: {int(now.sum())} kept, {int((status == 1).sum())} "
                                     f"{self.reduced_verb}", groups=None if groups is None else groups.reshape(grid),
                                     state=status.reshape(grid), block=rec.block))
        return maps

    def picture_legend(self) -> str:
        """How to read :meth:`token_maps` pictures."""
        return f"tinted: pruned at this block ({self.reduced_verb}); grey: pruned at an earlier block"

