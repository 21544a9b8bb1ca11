"""Attention layers every stage can take apart: unfused equivalents of torch's, and their head structure.

``torch.nn.MultiheadAttention`` keeps q, k and v in one packed projection whose width is also the embedding
width, and ``nn.TransformerEncoderLayer`` runs, in eval mode, one fused kernel
(``aten::_transformer_encoder_layer_fwd``) that no converter knows. So:

* `unfuse` replaces each ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer`` and
  ``nn.MultiheadAttention`` of a model with an equivalent made of plain layers (separate q/k/v ``Linear``\\ s,
  an explicit softmax): same outputs (checked), same call signatures, no fast path. The student is unfused
  when it is made (`toolchain.compress.make_student`), so pruning, export and every converter see plain
  MatMul/Softmax.
* `head_layers` finds each attention layer's q/k/v projections and its head count (ours, the unfused ones,
  and a hand-written module with ``num_heads``/``n_heads``/``heads`` and ``q``/``k``/``v``,
  ``q_proj``/``k_proj``/``v_proj`` or ``query``/``key``/``value`` linears), which torch-pruning needs to remove
  whole heads; `sync_heads` writes the pruned head counts back into the modules.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgecore.errors import CompressionError

_HEAD_ATTRS = ("num_heads", "n_heads", "heads", "n_head", "num_attention_heads")
_QKV_NAMES = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"),
              ("to_q", "to_k", "to_v"))


class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s call and result, with separate q/k/v projections and no fused kernel.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)``. ``num_heads`` is read at every
    call; the head width is the q projection's width over it, so pruning whole heads keeps it consistent.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, batch_first: bool, dropout: float = 0.0,
                 bias: bool = True, kdim: int | None = None, vdim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, where: str) -> "UnfusedMultiheadAttention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise CompressionError(f"{where}: nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be "
                                   "unfused; leave \"prune\" out of compress.passes")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first, dropout=mha.dropout, bias=bias,
                  kdim=mha.kdim, vdim=mha.vdim)
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                w = mha.in_proj_weight
                ws = (w[:e], w[e:2 * e], w[2 * e:])
            else:
                ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for lin, wi, i in zip((new.q, new.k, new.v), ws, range(3)):
                lin.weight.copy_(wi)
                if bias:
                    lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        h = self.num_heads
        q = self.q(query).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, L, d)
        k = self.k(key).unflatten(-1, (h, -1)).transpose(1, 2)
        v = self.v(value).unflatten(-1, (h, -1)).transpose(1, 2)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, S)
        if is_causal and attn_mask is None:
            n, s = scores.shape[-2:]
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(scores.shape[0], h, *attn_mask.shape[-2:])
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = torch.softmax(scores, dim=-1)
        out = F.dropout(attn, self.dropout, self.training) @ v
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(1) if average_attn_weights else attn


class UnfusedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (pre- or post-norm) on `UnfusedMultiheadAttention`, no fast path."""

    def __init__(self, layer: nn.TransformerEncoderLayer, where: str) -> None:
        super().__init__()
        self.self_attn = UnfusedMultiheadAttention.from_torch(layer.self_attn, f"{where}.self_attn")
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.norm_first = layer.norm_first
        act: Any = layer.activation
        self.activation: nn.Module = act if isinstance(act, nn.Module) else _Fn(act)
        self.train(layer.training)

    def _sa(self, x: torch.Tensor, mask: torch.Tensor | None, kpm: torch.Tensor | None, causal: bool) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False,
                                            is_causal=causal)[0])

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff(x))


class UnfusedEncoder(nn.Module):
    """``nn.TransformerEncoder``: the unfused layers in turn, then the optional final norm."""

    def __init__(self, enc: nn.TransformerEncoder, where: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(UnfusedEncoderLayer(layer, f"{where}.layers.{i}")
                                    for i, layer in enumerate(enc.layers))
        self.norm = enc.norm

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x


class _Fn(nn.Module):
    """A functional activation (``F.gelu``, ``F.relu``) as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _replacement(name: str, m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.TransformerEncoder):
        return UnfusedEncoder(m, name)
    if isinstance(m, nn.TransformerEncoderLayer):
        return UnfusedEncoderLayer(m, name)
    if isinstance(m, nn.MultiheadAttention):
        return UnfusedMultiheadAttention.from_torch(m, name)
    return None


def unfuse(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with torch's transformer layers replaced by their unfused equivalents.

    A model without them is returned as is (not copied). With ``example``, the copy's outputs are checked
    against the original's in eval mode; a difference is a `CompressionError` naming the model's class.
    """
    if not any(isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention))
               for m in model.modules()):
        return model
    new = copy.deepcopy(model)
    _replace_children(new, "")
    if example is not None:
        was = model.training
        model.eval(), new.eval()
        with torch.no_grad():
            a, b = model(example), new(example)
        model.train(was), new.train(was)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not torch.allclose(a, b, atol=1e-4,
                                                                                             rtol=1e-4):
            raise CompressionError(
                f"{type(model).__name__}: its transformer layers rewritten without the fused fast path give "
                f"other outputs (max difference {float((a - b).abs().max()):.3g}); leave \"prune\" out of "
                "compress.passes")
    return new


def _replace_children(module: nn.Module, prefix: str) -> None:
    for name, child in list(module.named_children()):
        where = f"{prefix}.{name}" if prefix else name
        new = _replacement(where, child)
        if new is not None:
            setattr(module, name, new)
        else:
            _replace_children(child, where)


def head_count(m: nn.Module) -> int | None:
    for attr in _HEAD_ATTRS:
        value = getattr(m, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _qkv(m: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    for names in _QKV_NAMES:
        layers = [getattr(m, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return layers[0], layers[1], layers[2]  # type: ignore[return-value]
    return None


def looks_like_attention(m: nn.Module) -> bool:
    return "attention" in type(m).__name__.lower() or isinstance(m, nn.MultiheadAttention)


def head_layers(model: nn.Module) -> dict[nn.Module, tuple[nn.Linear, nn.Linear, nn.Linear]]:
    """Each attention module with a head count and separate q/k/v linears -> its (q, k, v)."""
    found: dict[nn.Module, tuple[nn.Linear, nn.Linear, nn.Linear]] = {}
    for m in model.modules():
        heads, qkv = head_count(m), _qkv(m)
        if heads is not None and qkv is not None and all(lin.out_features % heads == 0 for lin in qkv):
            found[m] = qkv
    return found


def unhandled_attention(model: nn.Module) -> list[str]:
    """Names of modules that look like attention but whose heads `head_layers` cannot find."""
    known = head_layers(model)
    return [name for name, m in model.named_modules() if looks_like_attention(m) and m not in known
            and not any(m is k or any(m is c for c in k.modules()) for k in known)]


def sync_heads(layers: dict[nn.Module, tuple[nn.Linear, nn.Linear, nn.Linear]],
               pruned_heads: dict[nn.Module, int]) -> None:
    """Write the head counts torch-pruning left (keyed by projection) into the attention modules of ``layers``
    (`head_layers` of the model before pruning)."""
    for m, (q, _k, _v) in layers.items():
        if q in pruned_heads:
            heads = int(pruned_heads[q])
            for attr in _HEAD_ATTRS:
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, heads)
            if isinstance(getattr(m, "head_dim", None), int):
                m.head_dim = q.out_features // heads


class RelationTap:
    """Keeps the q, k and v projections' outputs of a model's last attention layer at every forward pass.

    What MiniLM-style distillation compares (`relation_loss`): not the hidden states themselves, whose widths
    differ between a teacher and its pruned or smaller student, but the token-to-token relations they induce.
    """

    def __init__(self, model: nn.Module, who: str) -> None:
        layers = list(head_layers(model).items())
        if not layers:
            raise CompressionError(f"distill.hidden_weight: the {who} ({type(model).__name__}) has no attention "
                                   "layer with a head count and separate q/k/v projections to imitate; set "
                                   "distill.hidden_weight = 0")
        self.module, qkv = layers[-1]
        self.heads = head_count(self.module) or 1
        self.out: dict[str, torch.Tensor] = {}
        self._handles = [lin.register_forward_hook(self._keep(name)) for name, lin in zip("qkv", qkv)]

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            self.out[name] = out

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def relation_loss(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor],
                  relation_heads: int) -> torch.Tensor:
    """MiniLMv2's self-attention relation distillation (Wang et al., 2021), for any two widths.

    For each of q, k and v: both models' (B, N, D) projection outputs (the unfused attention projects
    batch-first whatever its input layout) are split into ``relation_heads`` equal chunks, each
    chunk's scaled dot-product relation ``softmax(x xᵀ / sqrt(d))`` (N x N per token) is formed, and the student's
    is pulled to the teacher's with KL(teacher || student), averaged over the three, the heads and the tokens.
    """
    losses = []
    for name in "qkv":
        t, s = teacher[name].detach(), student[name]
        if t.shape[:2] != s.shape[:2]:
            raise CompressionError(f"distill.hidden_weight: teacher and student see different token counts "
                                   f"({t.shape[1]} and {s.shape[1]}); relations need the same tokens")

        def rel(x: torch.Tensor) -> torch.Tensor:
            x = x.unflatten(-1, (relation_heads, -1)).transpose(1, 2)  # (B, R, N, d)
            return (x @ x.transpose(-2, -1)) * x.shape[-1] ** -0.5

        log_s = F.log_softmax(rel(s), dim=-1)
        p_t = F.softmax(rel(t), dim=-1)
        losses.append(F.kl_div(log_s.flatten(0, 2), p_t.flatten(0, 2), reduction="batchmean"))
    return torch.stack(losses).mean()


__all__ = ["RelationTap", "relation_loss", "UnfusedEncoder", "UnfusedEncoderLayer", "UnfusedMultiheadAttention", "head_count", "head_layers",
           "looks_like_attention", "sync_heads", "unfuse", "unhandled_attention"]
