"""Configuration of the MoE adapter (shaped like PEFT's LoraConfig: one dataclass, help on every field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.bundle import BALANCE_LOSSES, PLACEMENTS  # the manifest's values, defined once (re-exported)


class ConfigError(ValueError):
    """A setting is invalid; the message names the command-line flag and how to fix it."""


@dataclass
class MoEAdapterConfig:
    """Settings of the FFT-MoE adapter that is injected after every transformer block's FFN."""

    num_experts: int = field(default=8, metadata={"help": "M: global experts per layer (--experts)."})
    expert_dim: int = field(default=64, metadata={"help": "r: hidden width of each expert FFN d -> r -> d (--expert-dim)."})
    top_k: int = field(default=2, metadata={"help": "Experts active per token; a tier with t slots uses min(top_k, t) (--top-k)."})
    aux_alpha: float = field(
        default=0.01, metadata={"help": "Weight of the load-balance term t * sum_j f_j p_j in the loss (--alpha); 0 turns it off."}
    )
    aux_beta: float = field(
        default=0.01,
        metadata={"help": "Weight of the heterogeneity term KL(q || p_bar) towards the target q in the loss (--beta); 0 turns it off."},
    )
    balance_loss: str = field(
        default="switch",
        metadata={
            "help": "The load-balance term (--balance-loss). switch: t * sum_j f_j p_j on every tier, a constant (no "
            "gradient) on a tier whose every slot is active (k = t); switch-soft: the same where k < t, and "
            "t * sum_j p_j^2 where k = t, which has a gradient and is 1 at a uniform router."
        },
    )
    placement: str = field(
        default="post-ln",
        metadata={
            "help": "Where each block's adapter adds its output (--adapter-placement). post-ln: after the FFN "
            "output's LayerNorm, h' = LN(F(a) + a) + MoE(LN(F(a) + a)); pre-ln: inside the residual, before the "
            "LayerNorm, as a parallel adapter on the FFN's input a: h' = LN(F(a) + a + MoE(a)). Post-LN encoders only."
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal init of router, expert input layers and head."})
    seed: int = field(default=0, metadata={"help": "Seed of the adapter's initialisation (--seed)."})

    def __post_init__(self) -> None:
        if self.balance_loss not in BALANCE_LOSSES:
            raise ConfigError(f"--balance-loss {self.balance_loss!r}: choose one of {', '.join(BALANCE_LOSSES)}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--adapter-placement {self.placement!r}: choose one of {', '.join(PLACEMENTS)}")
        if self.num_experts < 1:
            raise ConfigError(f"--experts must be >= 1, got {self.num_experts}")
        if self.expert_dim < 1:
            raise ConfigError(f"--expert-dim must be >= 1, got {self.expert_dim}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"--top-k {self.top_k} exceeds --experts {self.num_experts}: choose --top-k <= --experts")
        for flag, value in (("--alpha", self.aux_alpha), ("--beta", self.aux_beta)):
            if not value >= 0.0 or value == float("inf"):  # also rejects NaN
                raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")

    def active_experts(self, slots: int) -> int:
        """k for a tier with ``slots`` slots: min(top_k, slots)."""
        return min(self.top_k, slots)


def parse_tiers(text: str, num_experts: int) -> list[int]:
    """Parse ``--tiers 2,4,8`` into sorted distinct ints, each in 1..M; errors name the flag and the bad value."""
    tiers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ConfigError(f"--tiers {text!r}: empty entry; give expert counts separated by commas, e.g. --tiers 2,4,8")
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(f"--tiers {text!r}: {part!r} is not an integer; e.g. --tiers 2,4,8") from None
        if value < 1:
            raise ConfigError(f"--tiers {text!r}: {value} is < 1; a tier holds at least one expert")
        if value > num_experts:
            raise ConfigError(f"--tiers {text!r}: {value} exceeds --experts {num_experts}; raise --experts or drop the tier")
        tiers.add(value)
    return sorted(tiers)


DEFAULT_LORA_TARGETS = ("query", "key", "value", "dense")
"""PEFT target_modules matching every linear layer of a BERT- or ViT-style block (attention q, k, v and output,
FFN in and out); the pooler is not loaded."""


@dataclass
class LoraAdapterConfig:
    """Settings of the LoRA baselines (PEFT's LoraConfig with dropout 0 and no bias), one rank per tier."""

    method: str = field(default="fedit", metadata={"help": "fedit (one rank for every tier, FedAvg) or hetlora (a rank per tier) (--method)."})
    ranks: dict[int, int] = field(default_factory=dict, metadata={"help": "Tier -> LoRA rank (--ranks)."})
    target_modules: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "PEFT target_modules (--lora-targets)."})
    scale: float = field(default=2.0, metadata={"help": "lora_alpha / rank, equal for every tier (--lora-scale)."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal init of the classification head."})
    seed: int = field(default=0, metadata={"help": "Seed of the adapter's initialisation (--seed)."})

    def __post_init__(self) -> None:
        if self.method not in ("fedit", "hetlora"):
            raise ConfigError(f"--method {self.method!r}: a LoRA baseline is fedit or hetlora")
        if not self.ranks:
            raise ConfigError("--ranks is empty: give one rank (fedit) or one per tier (hetlora), e.g. --ranks 14,29,58")
        if any(r < 1 for r in self.ranks.values()):
            raise ConfigError(f"--ranks must all be >= 1, got {sorted(self.ranks.values())}")
        if self.method == "fedit" and len(set(self.ranks.values())) != 1:
            raise ConfigError(f"--method fedit trains one rank on every tier, got ranks {self.ranks}; give one --ranks value, or use --method hetlora")
        if not self.target_modules or not all(self.target_modules):
            raise ConfigError("--lora-targets is empty: name the linear modules to adapt, e.g. query,key,value,dense")
        if not (self.scale > 0 and self.scale != float("inf")):
            raise ConfigError(f"--lora-scale must be a positive number, got {self.scale}")

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


def parse_ranks(text: str, tiers: list[int]) -> dict[int, int]:
    """``--ranks 32`` (every tier) or ``--ranks 14,29,58`` (one per tier, in the order of the sorted tiers)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ranks {text!r}: give integers separated by commas, e.g. --ranks 32 or --ranks 14,29,58") from None
    if len(values) == 1:
        return {t: values[0] for t in tiers}
    if len(values) != len(tiers):
        raise ConfigError(f"--ranks {text!r} gives {len(values)} ranks for {len(tiers)} tiers ({','.join(map(str, tiers))}): give one, or one per tier")
    return dict(zip(tiers, values))
