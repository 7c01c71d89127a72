"""Gated DeltaNet (Qwen3-Next, Qwen3.5): linear attention whose memory is a per-sequence state, not per-token KV.

State of one sequence in one layer: one fp32 row of KVCache.states[layer], packed as
    [conv_dim * (K - 1)]  the last K-1 inputs of the causal conv, [conv_dim, K-1] row-major (oldest first)
    [Hv * Dk * Dv]         the recurrent state, [Hv, Dk, Dv] row-major
A chunk of a sequence with no cached tokens ignores whatever its row holds (a slot is reused unreset).
"""

import torch
import torch.nn.functional as F
from torch import nn

from krasis.common.kv_cache import ForwardBatch, SequenceSlice
from krasis.common.layers.attention import per_sequence
from krasis.common.layers.delta_rule import (
    causal_conv,
    causal_conv_step,
    chunked_delta_rule,
    delta_rule_step,
    prepare_qk,
)
from krasis.common.layers.mlp import activation
from krasis.common.layers.norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    """Qwen3-Next layout: q, k, v, z from one projection grouped by key head (`in_proj_qkvz`); b, a from
    `in_proj_ba`."""

    def __init__(self, layer_idx: int, cfg):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads {self.num_v_heads} is not a multiple of linear_num_key_heads")
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        self.conv_dim, self.kernel = 2 * self.key_dim + self.value_dim, cfg.linear_conv_kernel_dim
        self.act_fn = activation(cfg.hidden_act)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)
        self.build_projections(cfg.hidden_size)

    def build_projections(self, hidden_size: int) -> None:
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [T, H] -> conv input [T, conv_dim] (all q, all k, all v), z [T, Hv, Dv], b, a [T, Hv]."""
        tokens, per_k = x.shape[0], self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(tokens, self.num_k_heads, -1)
        widths = [self.head_k_dim, self.head_k_dim, per_k * self.head_v_dim, per_k * self.head_v_dim]
        q, k, v, z = qkvz.split(widths, dim=-1)
        b, a = self.in_proj_ba(x).view(tokens, self.num_k_heads, 2 * per_k).split([per_k, per_k], dim=-1)
        mixed = torch.cat([t.reshape(tokens, -1) for t in (q, k, v)], dim=-1)
        return mixed, z.reshape(tokens, self.num_v_heads, self.head_v_dim), b.reshape(tokens, -1), a.reshape(tokens, -1)

    @property
    def kv_width(self) -> int:
        return 0

    @property
    def state_width(self) -> int:
        return self.conv_dim * (self.kernel - 1) + self.num_v_heads * self.head_k_dim * self.head_v_dim

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x: [T, H]
        tokens = x.shape[0]
        mixed, z, b, a = self.project(x)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [T, Hv], log-space decay
        states = batch.kv.states[self.layer_idx]
        # one cached token per sequence (decode): all such sequences in one batched step, as the reference steps them
        rows, slots = batch.single_token_decodes
        if isinstance(slots, torch.Tensor):
            slots = slots.to(states.device)
        if rows.numel() == tokens:  # a decode step: every row, in order
            out = self._decode(mixed, g, beta, states, slots)
        else:
            out = x.new_empty(tokens, self.num_v_heads, self.head_v_dim)
            if rows.numel():
                out[rows] = self._decode(mixed[rows], g[rows], beta[rows], states, slots)
            for rows, seq in per_sequence(batch):
                if seq.num_cached == 0 or seq.query_len > 1:
                    out[rows] = self._sequence(mixed[rows], g[rows], beta[rows], states, seq)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.view(tokens, -1))

    def _decode(self, mixed, g, beta, states: torch.Tensor, slots: "torch.Tensor | slice") -> torch.Tensor:
        """One new token of each of B cached sequences, from and back to their state rows `slots` ([B], or a slice of
        consecutive rows). mixed: [B, conv_dim] -> [B, Hv, Dv]."""
        conv_width, count = self.conv_dim * (self.kernel - 1), mixed.shape[0]
        # A slice of rows is a view: the delta rule updates the recurrent states in the pool, in place (each copy of a
        # Qwen3-Next state is 2 MB a sequence and layer). Slot tensors gather copies, written back after.
        conv_state = states[slots, :conv_width].view(count, self.conv_dim, self.kernel - 1)
        recurrent = states[slots, conv_width:].view(count, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        conv_out, conv_state = causal_conv_step(mixed, conv_state, self.conv1d.weight)
        out = delta_rule_step(*self._qkv(conv_out), g, beta, recurrent)
        states[slots, :conv_width] = conv_state.flatten(-2)
        if isinstance(slots, torch.Tensor):
            states[slots, conv_width:] = recurrent.flatten(-3)
        return out.to(mixed.dtype)

    def _sequence(self, mixed, g, beta, states: torch.Tensor, seq: SequenceSlice) -> torch.Tensor:
        """One sequence's chunk of new tokens, from and back to its state row. mixed: [T, conv_dim] -> [T, Hv, Dv]."""
        slot = self._state_slot(states, seq)
        row = states.new_zeros(self.state_width) if seq.num_cached == 0 else states[slot]
        conv_state, recurrent = self._unpack(row)
        conv_out, conv_state = causal_conv(mixed, conv_state, self.conv1d.weight)
        out, recurrent = chunked_delta_rule(*self._qkv(conv_out), g, beta, recurrent)
        self._write_state(states, slot, conv_state, recurrent)
        return out.to(mixed.dtype)

    def _qkv(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv outputs [T, conv_dim] -> prepared q, k [T, Hv, Dk] (fp32), v [T, Hv, Dv]."""
        q, k, v = self.act_fn(conv_out).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        key_heads = (-1, self.num_k_heads, self.head_k_dim)
        q, k = prepare_qk(q.reshape(key_heads), k.reshape(key_heads), self.num_v_heads)
        return q, k, v.reshape(-1, self.num_v_heads, self.head_v_dim)

    def _state_slot(self, states: torch.Tensor, seq: SequenceSlice) -> int:
        if seq.state_slot is None or not 0 <= seq.state_slot < states.shape[0]:
            raise ValueError(f"layer {self.layer_idx}: a sequence without a valid state slot ({seq.state_slot})")
        return seq.state_slot

    def _unpack(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A state row [state_width] -> conv state [conv_dim, K-1], recurrent state [Hv, Dk, Dv] (views)."""
        conv_width = self.conv_dim * (self.kernel - 1)
        recurrent_shape = (self.num_v_heads, self.head_k_dim, self.head_v_dim)
        return row[:conv_width].view(self.conv_dim, -1), row[conv_width:].view(recurrent_shape)

    def _write_state(self, states: torch.Tensor, slots, conv_state, recurrent) -> None:
        """Write back one sequence's row (`slots` an int)."""
        conv_width = self.conv_dim * (self.kernel - 1)
        states[slots, :conv_width] = conv_state.flatten(-2)
        states[slots, conv_width:] = recurrent.flatten(-3)


class SplitGatedDeltaNet(GatedDeltaNet):
    """Qwen3.5 layout: separate `in_proj_qkv` (all q, all k, all v), `in_proj_z`, `in_proj_b`, `in_proj_a`."""

    def build_projections(self, hidden_size: int) -> None:
        self.in_proj_qkv = nn.Linear(hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.in_proj_z(x).view(x.shape[0], self.num_v_heads, self.head_v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
