"""The LoRA baselines (FedIT, HetLoRA): PEFT's own LoRA injected into the frozen encoder, behind the same training
graph contract as the MoE adapter (``exporter.model.AdaptedEncoder``), so the same exporter, edge runtime and
coordinator run them.

A tier of a LoRA bundle trains rank ``r_t``; the coordinator keeps one global adapter at the largest rank R. A tier
gets the first ``r_t`` rows of each ``A`` [R, in] and the first ``r_t`` columns of each ``B`` [out, R] (HetLoRA's
truncation); every tier uses the same ``lora_alpha / r`` so a truncated adapter means what its components meant in
the full one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_runtime.bundle import LORA_MATRICES, LoraInfo, LoraParam, Manifest, global_head_key, global_lora_key
from exporter.config import ConfigError, LoraAdapterConfig
from exporter.model import AdaptedEncoder, Architecture


class LoraModel(AdaptedEncoder):
    """Frozen encoder + PEFT LoRA adapters of one rank on ``config.target_modules`` + a classification head.

    Its routing is one constant "slot" per layer (every token uses the adapter), so the outputs have the MoE
    model's shapes with width 1: route_counts = route_prob_sum = real tokens per layer, and the auxiliary terms are
    constants that do not enter the loss.
    """

    route_width = 1

    def __init__(self, encoder: nn.Module, arch: Architecture, config: LoraAdapterConfig, rank: int, num_labels: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        super().__init__(encoder, arch, num_labels)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.config = config
        self.rank = rank
        peft_config = LoraConfig(
            r=rank, lora_alpha=config.scale * rank, target_modules=list(config.target_modules), lora_dropout=0.0, bias="none"
        )
        try:
            self.encoder = inject_adapter_in_model(peft_config, self.encoder)
        except ValueError as exc:  # PEFT's NoMatchingPeftModuleError
            raise ConfigError(f"no module of the encoder matches --lora-targets {','.join(config.target_modules)} ({exc})") from exc
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
        self.lora_modules: dict[str, LoraLayer] = {n: m for n, m in self.encoder.named_modules() if isinstance(m, LoraLayer)}
        if not self.lora_modules:
            raise ConfigError(f"no module of the encoder matches --lora-targets {','.join(config.target_modules)}")

    def routing(self, token_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ones = torch.ones_like(token_mask, dtype=torch.float32).unsqueeze(-1)  # [B, S, 1]
        return [(ones, ones)] * self.num_layers

    def lora_params(self) -> list[LoraParam]:
        names = {id(p): n for n, p in self.named_parameters()}
        out = []
        for module_name, module in self.lora_modules.items():
            for matrix, sub in zip(LORA_MATRICES, (module.lora_A["default"], module.lora_B["default"])):
                out.append(LoraParam(names[id(sub.weight)], module_name, matrix, tuple(sub.weight.shape)))
        return out

    @torch.no_grad()
    def load_global(self, pool: dict[str, np.ndarray], assignment: list[list[int]] | None = None) -> None:
        """Fill the adapters from the global pool, truncated to this model's rank (``assignment`` is ignored)."""
        for module_name, module in self.lora_modules.items():
            a = pool[global_lora_key(module_name, "A")][: self.rank]  # [r, in]
            b = pool[global_lora_key(module_name, "B")][:, : self.rank]  # [out, r]
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(a)))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        for t in ("weight", "bias"):
            getattr(self.head, t).copy_(torch.from_numpy(pool[global_head_key(t)]))


def init_lora_pool(config: LoraAdapterConfig, model: LoraModel) -> dict[str, np.ndarray]:
    """Initial global adapter at the largest rank R (float32, seeded): A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT's
    kaiming-uniform default, B = 0 (so the adapted model starts as the pretrained encoder), head ~ N(0, init_std)."""
    rng = np.random.default_rng(config.seed)
    rank = config.max_rank
    pool: dict[str, np.ndarray] = {}
    for module_name, module in model.lora_modules.items():
        fan_in, fan_out = module.in_features, module.out_features
        bound = 1.0 / np.sqrt(fan_in)
        pool[global_lora_key(module_name, "A")] = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
        pool[global_lora_key(module_name, "B")] = np.zeros((fan_out, rank), np.float32)
    d, n = model.head.in_features, model.head.out_features
    pool[global_head_key("weight")] = rng.normal(0.0, config.init_std, (n, d)).astype(np.float32)
    pool[global_head_key("bias")] = np.zeros(n, np.float32)
    return pool


def lora_info(config: LoraAdapterConfig) -> LoraInfo:
    """What the manifest records of a LoRA configuration."""
    return LoraInfo(list(config.target_modules), config.max_rank, config.scale)


def lora_config_from_manifest(manifest: Manifest) -> LoraAdapterConfig:
    """The LoRA configuration a bundle was exported with (to rebuild its PyTorch models)."""
    if manifest.lora is None:
        raise ValueError(f"the bundle's method is {manifest.method}, not a LoRA baseline")
    ranks = {slots: int(t.rank or manifest.lora.max_rank) for slots, t in manifest.tiers.items()}
    return LoraAdapterConfig(method=manifest.method, ranks=ranks, target_modules=tuple(manifest.lora.target_modules), scale=manifest.lora.scale)
