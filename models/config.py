"""ModelConfig: the architecture of a Llama-3.x / Qwen2.5 decoder, read from and written to HF config.json.

Both families are one decoder; their differences are fields here (qkv bias, tied embeddings, rope scaling),
never copies of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "causal_lm"),
    "Qwen2ForCausalLM": ("qwen2", "causal_lm"),
    "LlamaForSequenceClassification": ("llama", "seq_cls"),
    "Qwen2ForSequenceClassification": ("qwen2", "seq_cls"),
}
DTYPES = ("float32", "bfloat16", "float16")
# Keys of config.json without a default: the shapes of the model.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REMAT_POLICIES = ("none", "full", "dots")
# How full-sequence attention runs (models/attention.py): auto picks splash on TPU, cuDNN flash on GPU
# (bfloat16/float16), xla (the blocked path written for XLA:CPU, with its own gradient) elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")


class ConfigError(ValueError):
    """A config.json (or ModelConfig) asks for something this port does not support; names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 `llama3` rope scaling: long wavelengths divided by `factor`, short ones kept."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


# From this many layers on, `scan_layers="auto"` scans them: XLA then compiles one block instead of a copy per
# layer (benchmarks/compile_time.py, first update compile on CPU: 10 layers 61 s unrolled / 38 s scanned, 30
# layers 287 s / 34 s; at 4 layers no difference). Unrolled layers decode faster on CPU (no per-layer slicing of
# the stacked cache), so small models stay unrolled.
SCAN_LAYERS_FROM = 10


def scans_layers(setting: bool | str, num_layers: int) -> bool:
    """Whether a model of `num_layers` layers is scanned under the setting True, False or "auto"."""
    if setting == "auto":
        return num_layers >= SCAN_LAYERS_FROM
    if not isinstance(setting, bool):
        raise ConfigError(f"scan_layers must be true, false or 'auto', got {setting!r}")
    return setting


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus runtime choices (compute dtype, param dtype, remat, scanned layers, attention
    implementation). Hashable."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    num_labels: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool | str = False  # "auto": scanned from SCAN_LAYERS_FROM layers on (resolved at construction)
    attention: str = "auto"

    def __post_init__(self):
        if self.scan_layers == "auto":
            object.__setattr__(self, "scan_layers", scans_layers("auto", self.num_hidden_layers))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat: {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention: {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture][0]

    @property
    def kind(self) -> str:
        """'causal_lm' or 'seq_cls'."""
        return SUPPORTED_ARCHITECTURES[self.architecture][1]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF config.json in
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **runtime) -> "ModelConfig":
        """Reads both layouts: transformers-4 (`rope_theta`, `rope_scaling`) and transformers-5 (`rope_parameters`)."""
        archs = hf.get("architectures") or []
        if not archs:
            model_type = hf.get("model_type")
            archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(model_type, [])
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {archs!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = archs[0]
        family = SUPPORTED_ARCHITECTURES[arch][0]
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("mlp_bias", False):
            raise ConfigError("mlp_bias: true is not supported")
        if hf.get("use_sliding_window", False):
            raise ConfigError("use_sliding_window: sliding-window attention is not supported")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"layer_types: only 'full_attention' layers are supported, got {sorted(set(layer_types))}")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp: only 1 is supported")

        rope = hf.get("rope_parameters")
        if rope is None:
            rope = dict(hf.get("rope_scaling") or {})
            rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as err:
                raise ConfigError(f"rope_scaling: llama3 rope scaling is missing {err.args[0]!r}") from None
        else:
            raise ConfigError(f"rope_scaling.rope_type: {rope_type!r} is not supported (only 'default' and 'llama3')")

        if family == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        num_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 1))
        missing = [key for key in REQUIRED_KEYS if hf.get(key) is None]
        if missing:
            raise ConfigError(f"{missing[0]}: missing, and {arch} needs it" + (
                f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            num_labels=num_labels if SUPPORTED_ARCHITECTURES[arch][1] == "seq_cls" else 1,
            **runtime,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **runtime) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: no config.json in the model directory")
        try:
            with open(config_path, encoding="utf-8") as f:
                hf = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ConfigError(f"{config_path}: not valid JSON ({err})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{config_path}: expected a JSON object, got {type(hf).__name__}")
        try:
            return cls.from_hf_config(hf, **runtime)
        except ConfigError as err:
            raise ConfigError(f"{config_path}: {err}") from None

    # ---------------------------------------------------------------- HF config.json out
    def to_hf_config(self, transformers_major: int | None = None, dtype_name: str | None = None) -> dict[str, Any]:
        """The config.json dict in the layout the installed transformers reads (5.x: `rope_parameters`).

        dtype_name: the dtype the weights are stored in (default: param_dtype).
        """
        if transformers_major is None:
            transformers_major = installed_transformers_major()
        rope: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                None if not self.eos_token_id
                else self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
            ),
            "pad_token_id": self.pad_token_id,
            "torch_dtype" if transformers_major < 5 else "dtype": dtype_name or self.param_dtype,
        }
        if self.family == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        if transformers_major >= 5:
            out["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None if self.rope_scaling is None else rope
        if self.kind == "seq_cls":
            out["num_labels"] = self.num_labels
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return out


def installed_transformers_major() -> int:
    """Major version of the installed transformers, without importing it (importing it pulls in torch)."""
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except metadata.PackageNotFoundError:
        return 5
