"""What a calibration quantizes: per subgraph, its linears and fused MoE experts, decided before anything runs.

:func:`plan_quantization` applies the rules in one place: every ``nn.Linear`` in a subgraph's targets except
``lm_head``, MoE routing linears (:func:`routing_linears`) and names matching ``ignore``; fused experts of a supported
layout (see :mod:`seqgen.runtime.experts`); a weight that several targets share only at its first use. It refuses, with
the fix, a calibration with nothing to quantize and a group size that does not divide every weight's input width.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..algorithms import QuantScheme
from ..errors import SeqgenError
from ..package import Package, Subgraph
from .experts import expert_params, expert_weight, find_fused_experts, unsupported_experts

__all__ = ["QuantizationPlan", "SubgraphPlan", "plan_quantization", "quantizable_linears", "routing_linears"]

logger = logging.getLogger(__name__)

_SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class SubgraphPlan:
    """What one subgraph quantizes: linears and fused experts modules, by full module name."""

    linears: dict[str, torch.nn.Linear]
    experts: dict[str, torch.nn.Module]

    def __bool__(self) -> bool:
        return bool(self.linears or self.experts)


@dataclass(frozen=True)
class QuantizationPlan:
    """One :class:`SubgraphPlan` per subgraph of the package, up to the last that quantizes anything: the
    subgraphs after it are not run (their outputs, the logits, feed nothing that is quantized)."""

    subgraphs: tuple[SubgraphPlan, ...]

    def __len__(self) -> int:
        return len(self.subgraphs)

    def __getitem__(self, index: int) -> SubgraphPlan:
        return self.subgraphs[index]


def plan_quantization(
    model: torch.nn.Module,
    package: Package,
    *,
    scheme: QuantScheme,
    ignore: tuple[str, ...] = (),
    quantize_experts: bool = True,
    from_disk: bool = False,
) -> QuantizationPlan:
    """What each subgraph of ``package`` quantizes in ``model``; raises :class:`SeqgenError` when nothing is, or
    when ``scheme``'s group size does not fit a weight. ``from_disk``: weights are read from a checkpoint per
    subgraph, so a weight shared by several targets is refused (see :func:`_once_each`)."""
    linears = _once_each([quantizable_linears(model, sg, ignore) for sg in package.subgraphs], from_disk)
    experts = [_experts_of(model, sg, ignore) if quantize_experts else {} for sg in package.subgraphs]
    plans = [SubgraphPlan(*work) for work in zip(linears, experts, strict=True)]
    last = max((i for i, plan in enumerate(plans) if plan), default=-1)
    if last < 0:
        raise SeqgenError(
            f"no nn.Linear to quantize inside the targets of {package.path} (ignore patterns: "
            f"{ignore}); {_why_nothing_to_quantize(model, package)}"
        )
    plan = QuantizationPlan(tuple(plans[: last + 1]))
    _check_group_size(scheme, plan.subgraphs)
    return plan


def quantizable_linears(
    model: torch.nn.Module, subgraph: Subgraph, ignore: tuple[str, ...]
) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` inside the subgraph's targets, except ``lm_head``, MoE routing linears (see
    :func:`routing_linears`) and names matching ``ignore``."""
    patterns = [re.compile(p) for p in ignore]
    found: dict[str, torch.nn.Linear] = {}
    for target in subgraph.targets:
        root = model.get_submodule(target)
        routing = routing_linears(root)
        for name, module in root.named_modules():
            full = f"{target}.{name}" if name else target
            if not isinstance(module, torch.nn.Linear) or full.split(".")[-1] == "lm_head" or name in routing:
                continue
            if any(p.search(full) for p in patterns):
                continue
            found[full] = module
    return found


def routing_linears(root: torch.nn.Module) -> set[str]:
    """The names (under ``root``) of the linears that route tokens in its MoE blocks: routers (one logit per expert)
    and shared-expert gates (one output), which stay in full precision as serving engines expect (vLLM builds them
    unquantized) and as routing accuracy needs. An MoE block is a module with an ``experts`` child; its experts and
    shared experts are not routing."""
    found: set[str] = set()
    for block_name, block in root.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        if isinstance(experts, torch.nn.ModuleList):
            count = len(experts)
        else:
            fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
            count = fused[0].shape[0] if fused else None
        for name, module in block.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.split(".")[0] in ("experts", *_SHARED_EXPERT_NAMES):
                continue
            if module.out_features == 1 or module.out_features == count:
                found.add(f"{block_name}.{name}" if block_name else name)
    return found


def _experts_of(model: torch.nn.Module, subgraph: Subgraph, ignore: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The fused experts modules in the subgraph's targets that are calibrated, except names matching ``ignore``;
    a warning names each of an unsupported layout (left unquantized)."""
    found: dict[str, torch.nn.Module] = {}
    for target in subgraph.targets:
        module = model.get_submodule(target)
        for name in unsupported_experts(module, target):
            logger.warning("%s: fused experts of an unsupported layout are left unquantized", name)
        found.update(
            {n: m for n, m in find_fused_experts(module, target).items() if not any(re.search(p, n) for p in ignore)}
        )
    return found


def _once_each(plan: list[dict[str, torch.nn.Linear]], from_disk: bool) -> list[dict[str, torch.nn.Linear]]:
    """``plan`` with each weight kept at its first linear only. A weight that several targets share (Zamba ties one
    transformer block into several layers) is quantized once, with the statistics of its first use; later targets
    run it quantized. With weights read from disk a later target would read the unquantized weight again, so shared
    weights are refused there."""
    seen: dict[int, str] = {}
    kept = []
    for linears in plan:
        kept.append({})
        for name, module in linears.items():
            if id(module.weight) in seen:
                if from_disk:
                    raise SeqgenError(
                        f"{name} holds the same weight as {seen[id(module.weight)]} (layers that share a block); "
                        "disk offload would read it unquantized for the later layer. Use memory offload (the "
                        "default), or leave the shared block unquantized (--ignore a pattern that matches all its "
                        "names)."
                    )
                logger.debug("%s holds the weight of %s, quantized there", name, seen[id(module.weight)])
                continue
            seen[id(module.weight)] = name
            kept[-1][name] = module
    shared = sum(map(len, plan)) - sum(map(len, kept))
    if shared:
        logger.info("%d linears are shared between targets; each is quantized at its first use", shared)
    return kept


def _why_nothing_to_quantize(model: torch.nn.Module, package: Package) -> str:
    """The fix for a calibration with nothing to quantize: other --ignore or --targets, unless the targets hold their
    projections in module types that are not ``nn.Linear`` (GPT-2's ``Conv1D``), which are not quantized."""
    kinds = sorted(
        {
            type(m).__name__
            for target in {t for sg in package.subgraphs for t in sg.targets}
            for m in model.get_submodule(target).modules()
            if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2
        }
    )
    if kinds:
        return (
            f"the targets compute their projections with {', '.join(kinds)}, which seqgen does not quantize "
            "(only nn.Linear and fused MoE experts)."
        )
    return "check --ignore, or emit with other --targets."


def _input_widths(plans: Sequence[SubgraphPlan]) -> dict[str, tuple[int, str]]:
    """Each weight to quantize -> (its input width, the end of its module's name, which ``--ignore`` matches)."""
    widths: dict[str, tuple[int, str]] = {}
    for plan in plans:
        widths.update({name: (module.in_features, name.rsplit(".", 1)[-1]) for name, module in plan.linears.items()})
    for plan in plans:
        for name, module in plan.experts.items():  # ignore patterns match the experts module, not its parameters
            leaf = name.rsplit(".", 1)[-1]
            for param in expert_params(module):
                widths[f"{name}.{param}"] = (expert_weight(module, param, 0).shape[1], leaf)
    return widths


def _check_group_size(scheme: QuantScheme, plans: Sequence[SubgraphPlan]) -> None:
    """Refuse, before any calibration, a group size that does not divide the input width of every weight to quantize
    (otherwise the first such layer would fail after its subgraph's calibration pass)."""
    if scheme.group_size is None:
        return
    widths = _input_widths(plans)
    misfits: dict[int, list[str]] = {}
    for name, (width, _) in widths.items():
        if width % scheme.group_size:
            misfits.setdefault(width, []).append(name)
    if not misfits:
        return
    lines = []
    for width, names in sorted(misfits.items()):
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        lines.append(f"  in_features {width}: {', '.join(names[:2])}{more}")
    leaves = sorted({widths[name][1] for names in misfits.values() for name in names})
    common = math.gcd(*(width for width, _ in widths.values()))
    sizes = [g for g in (128, 64, 32, 16) if common % g == 0]
    size_hint = f"--group-size {sizes[0]} (divides every width), " if sizes else ""
    raise SeqgenError(
        f"group size {scheme.group_size} does not divide the input width of {sum(map(len, misfits.values()))} of "
        f"the {len(widths)} weights to quantize:\n" + "\n".join(lines) + "\n"
        f"Use {size_hint}--group-size -1 (one scale per output channel), or leave them unquantized with "
        + (f"--ignore '{leaves[0]}$'" if len(leaves) == 1 else f"--ignore '\\.({'|'.join(leaves)})$'")
        + "."
    )
