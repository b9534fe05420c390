"""Calibrating fused MoE experts: transformers 5 stores a layer's experts as 3D parameters, not ``nn.Linear``s.

The standard layout (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...) is ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, with ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` computing,
for each expert ``e``, ``down_e(act(gate_e(x)) * up_e(x))`` over the tokens routed to it. A forward pre-hook on the
experts module sees exactly those arguments, so each expert's two projections get their own statistics (GPTQ
Hessians) from the tokens routed to it, without changing the module or its kernel. With ``all_experts`` every token
also feeds every expert's statistics (the output is unchanged), so rarely routed experts still get Hessian data.

Each expert's slice is then quantized like a linear layer and written back, dequantized, into the 3D parameter
(``seqgen.checkpoint`` stores the compressed format as one packed linear per expert).
``down_proj``'s statistics see what the module computes between the two projections: its own ``_apply_gate`` where it
has one (clamped or soft-capped SwiGLUs of newer models), else ``act_fn(gate) * up``.

Ungated experts (Nemotron-H: ``up_proj [E, I, H]``, ``down_proj [E, H, I]``, ``down(act(up(x)))``) are handled the same
way. Llama 4's layout is calibrated too: transposed weights (``gate_up_proj [E, H, 2I]``, ``x @ W``) and a forward
that takes each token once per expert, pre-scaled by its router score (rows of zeros where it is not routed); each
expert's statistics take its nonzero rows (with ``all_experts``: the MoE block's unscaled input), and the weights are
quantized as ``[out, in]`` (``expert_weight``). Other layouts (gpt-oss's transposed weights with biases, a clamp
outside ``_apply_gate``, separate gate and up parameters) are reported and left unquantized, not guessed.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from ..algorithms import Algorithm, QuantizedWeight, Statistics, quantize_rtn
from ..errors import SeqgenError

__all__ = [
    "EXPERT_PARAMS",
    "UNGATED_PARAMS",
    "FusedExperts",
    "expert_params",
    "expert_weight",
    "find_fused_experts",
    "is_fused_experts",
    "is_transposed_experts",
    "unsupported_experts",
]

logger = logging.getLogger(__name__)

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # gated experts (gate and up stacked in the first)
UNGATED_PARAMS = ("up_proj", "down_proj")  # ungated experts, down(act(up(x))), as in Nemotron-H


def _is_3d(module: torch.nn.Module, name: str) -> bool:
    param = getattr(module, name, None)
    return isinstance(param, torch.nn.Parameter) and param.dim() == 3


def _is_ungated(module: torch.nn.Module) -> bool:
    return (
        _is_3d(module, "up_proj")
        and _is_3d(module, "down_proj")
        and not hasattr(module, "gate_proj")
        and not hasattr(module, "gate_up_proj")
    )


def is_fused_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds its experts as 3D ``gate_up_proj`` / ``down_proj`` parameters (any layout), or as
    ungated 3D ``up_proj`` / ``down_proj``."""
    down = getattr(module, "down_proj", None)
    gated = _is_3d(module, "gate_up_proj") and isinstance(down, torch.nn.Parameter)
    return gated or _is_ungated(module)


def expert_params(module: torch.nn.Module) -> tuple[str, str]:
    """The names of a fused experts module's two projections: the one that reads the tokens, then ``down_proj``."""
    return UNGATED_PARAMS if _is_ungated(module) else EXPERT_PARAMS


def _standard_layout(module: torch.nn.Module) -> bool:
    first, down = (getattr(module, name) for name in expert_params(module))
    experts, rows, hidden = first.shape
    inter = rows if _is_ungated(module) else rows // 2
    return (
        down.shape == (experts, hidden, inter)
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and callable(getattr(module, "act_fn", None))
        and (hasattr(module, "_apply_gate") or not hasattr(module, "limit"))  # a clamp outside _apply_gate: unknown
    )


def _gated(module: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """What ``down_proj`` reads, from the tokens' first projection: the module's own ``_apply_gate`` where it has one
    (clamps, softcaps, two-argument activations), else ``act_fn(gate) * up``, or ``act_fn(up)`` when ungated."""
    if _is_ungated(module):
        return module.act_fn(gate_up)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


# Llama 4 stores its experts transposed (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, applied as ``x @ W``)
# and its forward(hidden_states) takes every token once per expert, as rows ``[E * T, H]``, already scaled by the
# token's router score (zero where the token is not routed to the expert).
_TRANSPOSED_EXPERTS = ("Llama4TextExperts",)


def is_transposed_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` is fused experts of Llama 4's transposed, routed-rows layout."""
    return type(module).__name__ in _TRANSPOSED_EXPERTS and is_fused_experts(module)


def expert_weight(module: torch.nn.Module, param_name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s slice of the fused ``param_name`` as a linear weight ``[out, in]`` (a view)."""
    weight = getattr(module, param_name).data[expert]
    return weight.T if is_transposed_experts(module) else weight


def find_fused_experts(root: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """Fused experts modules that are calibrated, under ``root`` (names prefixed with ``prefix``, if any): the
    standard layout and Llama 4's."""
    return {
        ".".join(part for part in (prefix, name) if part): m
        for name, m in root.named_modules()
        if is_fused_experts(m) and (_standard_layout(m) or is_transposed_experts(m))
    }


def _holds_3d_projections(module: torch.nn.Module) -> bool:
    """Experts stored as 3D ``*_proj`` parameters in any arrangement (Nemotron-H's ungated ``up_proj``/``down_proj``
    too)."""
    return any(p.dim() == 3 and name.endswith("proj") for name, p in module.named_parameters(recurse=False))


def unsupported_experts(root: torch.nn.Module, prefix: str) -> list[str]:
    """Modules of fused experts that are not calibrated: any with 3D projections but not the standard layout."""
    calibrated = set(find_fused_experts(root, "").values())
    return [f"{prefix}.{name}" for name, m in root.named_modules() if _holds_3d_projections(m) and m not in calibrated]


class FusedExperts:
    """Statistics collection and quantization for one fused experts module (see the module docstring)."""

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        algorithm: Algorithm,
        all_experts: bool,
        parent: torch.nn.Module | None = None,
    ) -> None:
        """``parent`` (the MoE block that calls the experts) is needed for Llama 4's layout with ``all_experts``:
        its input is the tokens before router scores scale them."""
        self.name = name
        self.module = module
        self.algorithm = algorithm
        self.all_experts = all_experts
        self.transposed = is_transposed_experts(module)
        self.params = expert_params(module)
        first = getattr(module, self.params[0])
        if self.transposed:
            self.num_experts, self.hidden, rows = first.shape
        else:
            self.num_experts, rows, self.hidden = first.shape
        self.inter = rows if self.params == UNGATED_PARAMS else rows // 2
        self.parent = parent
        if self.transposed and all_experts and parent is None:
            raise SeqgenError(f"{name}: all_experts needs the MoE block that calls these experts (parent).")
        self.gate_up_stats: list[Statistics | None] = []  # of the first projection (gate_up, or up when ungated)
        self.down_stats: list[Statistics | None] = []
        self.routed = torch.zeros(self.num_experts, dtype=torch.long)
        self._unscaled: torch.Tensor | None = None  # Llama 4 with all_experts: the block's input tokens
        self.unrouted: list[int] = []  # experts that no calibration token reached: quantized round-to-nearest
        self.never_ran = False  # the module's forward never ran (text calibration of vision experts): left as it is
        self.active = range(self.num_experts)  # the experts this pass calibrates
        self._pending: list[tuple[str, int, QuantizedWeight]] = []  # compressed, not yet written back
        self._handles: list[Any] = []

    def select(self, active: range) -> None:
        """Collect statistics for, and then compress, only the experts ``active`` (one of several calibration passes
        that bound the memory of the statistics: see ``CalibrationOptions.experts_per_pass``)."""
        self.active = range(active.start, min(active.stop, self.num_experts))
        self.gate_up_stats, self.down_stats = [], []

    def _ensure_stats(self, device: torch.device) -> None:
        if not self.gate_up_stats:
            new = self.algorithm.new_statistics
            self.gate_up_stats = [
                new(self.hidden, device) if e in self.active else None for e in range(self.num_experts)
            ]
            self.down_stats = [new(self.inter, device) if e in self.active else None for e in range(self.num_experts)]

    @torch.no_grad()
    def _pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = hidden_states.reshape(-1, self.hidden)
        index = top_k_index.reshape(x.shape[0], -1)
        self._ensure_stats(x.device)
        # the tokens of each expert, in token order: one stable sort and one count per batch (no sync per expert)
        flat = index.reshape(-1)
        token_ids = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        if bool((flat < 0).any()):  # a slot routed nowhere (-1), as capacity-limited routers write
            token_ids, flat = token_ids[flat >= 0], flat[flat >= 0]
        by_expert = token_ids[torch.sort(flat, stable=True).indices]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        starts = [0, *itertools.accumulate(counts)]
        for e in self.active:
            self.routed[e] += counts[e]
            tokens = x if self.all_experts else x.index_select(0, by_expert[starts[e] : starts[e + 1]])
            if tokens.shape[0] == 0 or self.gate_up_stats[e] is None:
                continue
            self.gate_up_stats[e].update(tokens)
            first = getattr(module, self.params[0])[e]
            self.down_stats[e].update(_gated(module, torch.nn.functional.linear(tokens, first)))

    @torch.no_grad()
    def _pre_hook_transposed(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Llama 4: expert ``e`` reads rows ``[e * T, (e + 1) * T)``, its routed tokens scaled by their scores and
        zeros elsewhere; the statistics take the nonzero rows, as the expert computes on them."""
        rows = (args[0] if args else kwargs["hidden_states"]).reshape(self.num_experts, -1, self.hidden)
        self._ensure_stats(rows.device)
        routed = rows.ne(0).any(dim=-1)  # [E, T]
        counts = routed.sum(dim=-1).tolist()  # one sync per batch, not one per expert
        token_ids = routed.nonzero()[:, 1]  # grouped by expert, in token order
        starts = [0, *itertools.accumulate(counts)]
        for e in self.active:
            self.routed[e] += counts[e]
            tokens = (
                self._unscaled if self.all_experts else rows[e].index_select(0, token_ids[starts[e] : starts[e + 1]])
            )
            if tokens is None or tokens.shape[0] == 0 or self.gate_up_stats[e] is None:
                continue
            self.gate_up_stats[e].update(tokens)
            gate, up = (tokens @ module.gate_up_proj[e]).chunk(2, dim=-1)
            self.down_stats[e].update(up * module.act_fn(gate))
        self._unscaled = None

    def _keep_unscaled(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._unscaled = (args[0] if args else kwargs["hidden_states"]).reshape(-1, self.hidden)

    def __enter__(self) -> FusedExperts:
        hook = self._pre_hook_transposed if self.transposed else self._pre_hook
        self._handles.append(self.module.register_forward_pre_hook(hook, with_kwargs=True))
        if self.transposed and self.all_experts:
            assert self.parent is not None
            self._handles.append(self.parent.register_forward_pre_hook(self._keep_unscaled, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unscaled = None

    @torch.no_grad()
    def compress(self, defer: bool = False) -> dict[str, QuantizedWeight]:
        """Quantize the active experts' projections in place; keys are ``<module>.<param>.<expert>``. With
        ``defer`` their weights stay as they are until :meth:`write_back` (later calibration passes must see the
        model the one-pass calibration sees)."""
        needs_data = self.algorithm.new_statistics(1, torch.device("cpu")) is not None
        self.unrouted = []
        if not self.active:  # fewer experts than this pass's range starts at
            return {}
        if needs_data:
            self.never_ran = not self.gate_up_stats
            if self.never_ran:  # no statistics for any expert: they stay unquantized, as linears that never run
                return {}
            self.unrouted = [
                e
                for e in self.active
                if self.gate_up_stats[e] is not None and int(self.routed[e]) == 0 and not self.all_experts
            ]
            if self.unrouted:
                logger.warning(
                    "%s: experts %s received no calibration tokens and are quantized round-to-nearest (no Hessian); "
                    "--all-experts routes every calibration token through every expert's statistics.",
                    self.name,
                    self.unrouted,
                )
        done: dict[str, QuantizedWeight] = {}
        for param_name, stats in zip(self.params, (self.gate_up_stats, self.down_stats), strict=True):
            param = getattr(self.module, param_name)
            for e in self.active:
                expert_stats = stats[e] if stats else None
                if expert_stats is not None:  # reduced already (the calibration's reduce step)
                    expert_stats.single_use = True
                weight = expert_weight(self.module, param_name, e)  # [out, in]
                if e in self.unrouted:  # the same scheme, so the layer's experts stay one format
                    quantized = quantize_rtn(weight, self.algorithm.scheme)
                else:
                    quantized = self.algorithm.quantize(
                        weight.contiguous() if self.transposed else weight, expert_stats
                    )
                if expert_stats is not None:
                    expert_stats.release()  # freed once used: the memory of the statistics shrinks expert by expert
                done[f"{self.name}.{param_name}.{e}"] = quantized = quantized.to("cpu")
                if defer:
                    self._pending.append((param_name, e, quantized))
                else:
                    weight.copy_(quantized.dequantize(param.dtype))
        routed = self.routed[self.active.start : self.active.stop]
        logger.info(
            "%s: quantized %d experts (tokens routed per expert: min %d, max %d)",
            self.name,
            len(self.active),
            int(routed.min()),
            int(routed.max()),
        )
        return done

    @torch.no_grad()
    def write_back(self) -> None:
        """Write the dequantized weights that :meth:`compress` deferred into the fused parameters."""
        for param_name, e, quantized in self._pending:
            weight = expert_weight(self.module, param_name, e)
            weight.copy_(quantized.dequantize(weight.dtype).to(weight.device))
        self._pending.clear()
