"""The sampling warpers and the draw: temperature -> top-k -> top-p -> min-p as transformers' warpers, then one
token per row from a per-sequence uniform, independent of which rows share the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from krasis.common.sampling_params import SamplingParams

# top-p looks for its nucleus among this many best tokens first; a full sort of a 150K vocab
# costs ~15 ms a row on CPU, top-k of 1024 well under 1 ms.
TOP_P_WINDOW = 1024
# Ratios p / p_max below e^EXP_FLOOR count as 0 (see _ratio_to_max).
EXP_FLOOR = -80.0
# Columns per block in the two-level draw (see _inverse_cdf_draw).
DRAW_BLOCK = 256


def apply_warpers(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, as transformers' warpers: [S, V] fp32 -> [S, V].

    Filtered tokens become -inf. Rows must not be greedy.
    """
    out = torch.full_like(logits, -math.inf)
    for group in _warp(logits, params):
        if group.ids is None:
            out[group.rows] = group.logits
        else:
            out[group.rows] = out[group.rows].scatter(1, group.ids, group.logits)
    return out


@dataclass
class _Candidates:
    """Warped logits of some rows, either whole rows or each row's best tokens, best first."""

    rows: list[int]  # which of the warped rows
    logits: torch.Tensor  # [R, W], -inf where filtered
    ids: torch.Tensor | None  # [R, W] token ids of the columns; None: column == token id


def draw(x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Token ids [S] for penalized logits x [S, V], one uniform u [S] fp64 per row."""
    tokens = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for group in _warp(x, params):
        # Weights relative to the row's best token: elementwise, so a row's draw does not
        # depend on which rows or window widths it was batched with.
        weights = _ratio_to_max(group.logits, group.logits.amax(dim=-1, keepdim=True))
        picked = _inverse_cdf_draw(weights, u[group.rows])
        if group.ids is not None:
            picked = group.ids.gather(1, picked.unsqueeze(1)).squeeze(1)
        tokens[group.rows] = picked
    return tokens


def _warp(logits: torch.Tensor, params: list[SamplingParams]) -> list[_Candidates]:
    """Rows without top-k/top-p stay whole; the others keep only their best tokens.

    Top-k/top-p rows are grouped by window width, which depends only on the row's own
    params, so batching never changes what a row keeps or in what order.
    """
    x = logits
    if any(p.temperature != 1.0 for p in params):
        x = x / _column([p.temperature for p in params], x.device)
    whole: list[int] = []
    by_width: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        if p.top_k > 0:  # k + 1: to see whether the k-th logit ties past the window
            by_width.setdefault(min(p.top_k + 1, x.shape[-1]), []).append(i)
        elif p.top_p < 1.0:
            by_width.setdefault(min(TOP_P_WINDOW, x.shape[-1]), []).append(i)
        else:
            whole.append(i)
    groups = []
    if whole:
        groups.append(_Candidates(whole, x if len(whole) == len(params) else x[whole], None))
    for width, rows in by_width.items():
        groups += _top_k_top_p(x, rows, [params[i] for i in rows], width)
    for group in groups:
        group.logits = _min_p(group.logits, [params[i].min_p for i in group.rows])
    return groups


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _top_k_top_p(
    x: torch.Tensor, rows: list[int], params: list[SamplingParams], width: int
) -> list[_Candidates]:
    """Best `width` tokens of x[rows], filtered; rows whose nucleus does not fit are sorted
    whole (a 150K-vocab sort costs ~15 ms a row on CPU, a top-1024 ~1 ms)."""
    vocab = x.shape[-1]
    k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    logits, ids, complete = _window(x[rows], k.to(x.device), top_p.to(x.device), width)
    if bool(complete.all()):
        return [_Candidates(rows, logits, ids)]
    fit = complete.cpu().nonzero().squeeze(1).tolist()
    spill = (~complete).cpu().nonzero().squeeze(1).tolist()
    groups = [_Candidates([rows[j] for j in fit], logits[fit], ids[fit])] if fit else []
    spill_rows = [rows[j] for j in spill]
    logits, ids, _ = _window(x[spill_rows], k[spill].to(x.device), top_p[spill].to(x.device), vocab)
    return groups + [_Candidates(spill_rows, logits, ids)]


def _window(
    x: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k then top-p among each row's best `width` logits. x: [R, V]; k: [R] (V = off);
    top_p: [R] fp64 (1 = off). Returns logits [R, W] best first (-inf where filtered), their
    ids [R, W], and [R] whether every kept token lies in the window."""
    vocab = x.shape[-1]
    if width == vocab:
        best, ids = x.sort(dim=-1, descending=True)
    else:
        best, ids = x.topk(width, dim=-1)
    has_k = k < vocab
    k_floor = best.gather(1, (k.clamp(max=width) - 1).unsqueeze(1)).squeeze(1)
    k_floor = k_floor.masked_fill(~has_k, -math.inf)
    # The window holds every token tied with the k-th unless its last one is such a tie.
    k_complete = ~has_k | (best[:, -1] < k_floor) | (width == vocab)
    best = best.masked_fill(best < k_floor.unsqueeze(1), -math.inf)
    weights = _ratio_to_max(best, best[:, :1])
    mass = weights.cumsum(dim=-1, dtype=torch.float64)
    total = mass[:, -1]  # all top-k survivors, when the window holds them
    if not bool(has_k.all()):
        whole_row = _ratio_to_max(x, best[:, :1]).sum(dim=-1, dtype=torch.float64)
        total = torch.where(has_k, total, whole_row)
    # TopPLogitsWarper drops a token when the mass at or below it is <= 1 - p, i.e. keeps
    # it when the mass strictly above it is < p.
    kept = (mass - weights) < (top_p * total).unsqueeze(1)
    num_kept = kept.sum(dim=-1).clamp(min=1)
    p_floor = best.gather(1, (num_kept - 1).unsqueeze(1)).squeeze(1)
    floor = torch.where(top_p >= 1.0, k_floor, p_floor)
    # A nucleus that does not fit keeps the whole window, so its floor is the last entry.
    complete = k_complete & ((best[:, -1] < floor) | (width == vocab))
    return best.masked_fill(best < floor.unsqueeze(1), -math.inf), ids, complete


def _min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """MinPLogitsWarper: drop tokens with p < min_p * p_max. logits: [R, W]."""
    if not any(m > 0.0 for m in min_p):
        return logits
    ratio = _ratio_to_max(logits, logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(ratio < _column(min_p, logits.device), -math.inf)


def _ratio_to_max(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """p / p_max = exp(logits - row_max), exactly 0 below e^EXP_FLOOR and at -inf.

    CPU exp() of inputs that underflow takes a slow path (~50x); clamping avoids it.
    """
    floor = math.exp(EXP_FLOOR)
    return (logits - row_max).clamp_(min=EXP_FLOOR).exp_().sub_(floor).clamp_(min=0.0)


def _inverse_cdf_draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column [S] drawn from weights [S, W] (>= 0, unnormalized) with uniforms u [S] fp64.

    fp64 throughout (in fp32, tokens below ~1e-7 of the running mass vanish), in two levels:
    a block of DRAW_BLOCK columns by block mass, then a column inside it; an fp64 cumsum
    over a 150K row costs ~0.8 ms on CPU, the block sums ~0.06 ms.
    """
    rows, width = weights.shape
    blocks = F.pad(weights, (0, -width % DRAW_BLOCK)).view(rows, -1, DRAW_BLOCK)
    block_mass = blocks.sum(dim=-1, dtype=torch.float64)  # [S, NB]
    block_cdf = block_mass.cumsum(dim=-1)
    # u <= 1 - 2**-53 keeps target below the total, so block b exists and has mass.
    target = u.unsqueeze(1) * block_cdf[:, -1:]  # [S, 1]
    b = torch.searchsorted(block_cdf, target, right=True)
    rest = (target - block_cdf.gather(1, b) + block_mass.gather(1, b)).clamp(min=0.0)
    inner = blocks[torch.arange(rows, device=weights.device), b.squeeze(1)]  # [S, DRAW_BLOCK]
    inner_cdf = inner.cumsum(dim=-1, dtype=torch.float64)
    column = torch.searchsorted(inner_cdf, rest, right=True)
    # Rounding between the two levels can point past the block's last nonzero column.
    last_nonzero = (inner_cdf < inner_cdf[:, -1:]).sum(dim=-1, keepdim=True)
    return (b * DRAW_BLOCK + torch.minimum(column, last_nonzero)).squeeze(1)
