"""The gated delta rule in torch, fp32: chunked for one sequence's prompt, one step for a batch of decode tokens.

Per head, with state S [Dk, Dv], decay g_t <= 0 (log space) and write strength beta_t in (0, 1):
    S_t = exp(g_t) * S_{t-1} + k_t (beta_t * (v_t - k_t^T exp(g_t) S_{t-1}))^T,    o_t = S_t^T q_t / sqrt(Dk)
The chunked form (the UT transform of DeltaNet) turns each chunk's updates into a few matmuls and one
triangular solve; it equals the step-by-step form up to fp32 rounding. Chunks of 64 tokens, as the
reference's torch implementation uses.
"""

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as flash-linear-attention (and the reference) compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def prepare_qk(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [T, Hk, Dk] -> fp32, L2-normalized, each key head repeated for its Hv / Hk value heads, q scaled."""
    qk = l2_normalize(torch.stack((q, k)).float())  # one pass over both: [2, T, Hk, Dk]
    repeat = num_v_heads // k.shape[1]
    if repeat > 1:
        qk = qk.repeat_interleave(repeat, dim=2)
    return qk[0] * q.shape[-1] ** -0.5, qk[1]


def delta_rule_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One token of each of B sequences, updating `state` in place (each pass over it costs B x 2 MB a layer for
    Qwen3-Next). q, k: [B, H, Dk] (prepared); v: [B, H, Dv]; g, beta: [B, H]; state: [B, H, Dk, Dv] fp32, each
    sequence's [H, Dk, Dv] contiguous (rows of the state pool) -> outputs [B, H, Dv] fp32."""
    v, g, beta = v.float(), g.float(), beta.float()
    state.mul_(g.exp()[..., None, None])
    predicted = torch.einsum("bhk,bhkv->bhv", k, state)
    correction = (v - predicted) * beta[..., None]
    dk, dv = state.shape[-2:]
    if state.is_contiguous():
        state.view(-1, dk, dv).baddbmm_(k.reshape(-1, dk, 1), correction.reshape(-1, 1, dv))  # += k correction^T
    else:  # B pool rows in place: one batched update per sequence
        for seq_state, seq_k, seq_correction in zip(state, k, correction):
            seq_state.baddbmm_(seq_k[..., None], seq_correction[:, None, :])
    return torch.einsum("bhk,bhkv->bhv", q, state)


def _chunks(x: torch.Tensor, pad: int) -> torch.Tensor:
    # x: [T, H, ...] -> [H, chunks, CHUNK_TOKENS, ...], zero-padded at the end
    x = x.movedim(0, 1)
    x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 3 else F.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, CHUNK_TOKENS, *x.shape[2:])


def chunked_delta_rule(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's T tokens in chunks of CHUNK_TOKENS. q, k: [T, H, Dk] (prepared); v: [T, H, Dv]; g, beta: [T, H];
    state: [H, Dk, Dv] fp32 -> outputs [T, H, Dv] fp32, final state."""
    length = q.shape[0]
    pad = -length % CHUNK_TOKENS
    q, k, v = (_chunks(x.float(), pad) for x in (q, k, v))  # [H, N, C, D]
    g, beta = (_chunks(x.float(), pad) for x in (g, beta))  # [H, N, C]
    decay = g.cumsum(dim=-1)  # log of the decay from the chunk's start to each position
    # within-chunk decay from position j to i (i >= j); 0 above the diagonal
    upper = torch.ones(CHUNK_TOKENS, CHUNK_TOKENS, dtype=torch.bool, device=q.device).triu(1)
    pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    # (I + strictly-lower(beta K K^T decay)) solves for the chunk's corrections (its diagonal is taken as 1)
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay
    fresh = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * pair_decay
    q_decayed = q * decay.exp()[..., None]
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [H, N, 1, 1]
    out = torch.empty_like(fresh)
    for i in range(q.shape[1]):
        correction = fresh[:, i] - reads[:, i] @ state  # [H, C, Dv]
        out[:, i] = q_decayed[:, i] @ state + intra[:, i] @ correction
        state = state * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ correction
    return out.reshape(out.shape[0], -1, out.shape[-1])[:, :length].movedim(1, 0), state


def causal_conv(x: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over one sequence's new inputs, continuing from its last K-1 inputs.
    x: [T, C]; previous: [C, K-1]; weight: [C, 1, K] -> (outputs [T, C] before activation, new previous [C, K-1])."""
    window = torch.cat((previous.to(weight.dtype), x.t().to(weight.dtype)), dim=-1)  # [C, K-1+T]
    out = F.conv1d(window[None], weight, groups=weight.shape[0])[0]  # [C, T]
    return out.t().to(x.dtype), window[:, window.shape[1] - previous.shape[1] :]


def causal_conv_step(x: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv` for one new input of each of B sequences. x: [B, C]; previous: [B, C, K-1]; weight: [C, 1, K]
    -> (outputs [B, C] before activation, new previous [B, C, K-1])."""
    window = torch.cat((previous.to(weight.dtype), x[:, :, None].to(weight.dtype)), dim=-1)  # [B, C, K]
    # one output per channel: a K-term dot product, as a multiply and a sum (a depthwise conv1d call costs ~100 us
    # of setup on the CPU for this; the sum's order may differ from the conv's by fp32 rounding)
    out = (window * weight[:, 0]).sum(dim=-1)
    return out.to(x.dtype), window[:, :, 1:]
