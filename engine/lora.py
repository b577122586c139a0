"""LoRA adapters: one flat fp32 buffer, a view per matrix, PEFT's on-disk format.

Every A and B matrix of an adapter is a view into one contiguous fp32 buffer, in a fixed order
(layer ascending, then the model family's `lora_modules` order, A before B; for OPT q_proj, k_proj,
v_proj, out_proj, fc1, fc2), so one zo_update_ call updates the whole adapter and `offset` of a
matrix is its start in that flat space (the index its perturbation z is regenerated at;
docs/design.md, "The random numbers").

An adapter is made for a model config of any family: the config says which linears can be adapted
(`lora_modules`), their shapes (`lora_shape(name)`) and PEFT's key for each (`peft_prefix`). An
adapter trained on a quantized base (engine/quantized.py) records the base's quantization
(`base_quantization`, CausalLM.quantization) in adapter_config.json under `BASE_QUANTIZATION_KEY`:
the weights it was trained on are the dequantized ones (`flashzo merge` reads it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from flashzo.kernels import MAX_RANK
from flashzo.kernels.errors import InputError

# The adaptable linears of every family flashzo runs, in one canonical order: a LoRAConfig lists its
# targets in this order whatever order it was given (PEFT saves a set), so equal sets are equal configs.
KNOWN_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "fc1", "fc2", "gate_proj", "up_proj",
                 "down_proj")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
BASE_QUANTIZATION_KEY = "flashzo_base_quantization"  # adapter_config.json: the base's quantization, if any


@dataclass(frozen=True)
class LoRAConfig:
    """What a LoRA adapter trains: rank `r`, scale `alpha / r`, the `target_modules` (names from the
    family's `lora_modules`) on `layers` (None: every layer), and the `seed` of PEFT's initialisation
    (A kaiming-uniform, B = 0)."""

    r: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_RANK:
            raise InputError(f"r must be an integer in 1..{MAX_RANK}, got {self.r!r}")
        if not self.target_modules:
            raise InputError("target_modules is empty")
        bad = [m for m in self.target_modules if m not in KNOWN_MODULES]
        if bad:
            raise InputError(f"target_modules {bad} are not linears flashzo adapts; choose from {KNOWN_MODULES}")
        # canonical order (PEFT saves a set in any order): equal sets give equal configs and structures
        object.__setattr__(self, "target_modules", tuple(m for m in KNOWN_MODULES if m in self.target_modules))
        if not math.isfinite(float(self.alpha)) or float(self.alpha) <= 0:
            raise InputError(f"alpha must be positive, got {self.alpha}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise InputError(f"layers must be a non-empty list of layer indices, got {self.layers}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / int(self.r)

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(range(num_layers))
        if max(self.layers) >= num_layers:
            raise InputError(f"layers {list(self.layers)} out of range for a model with {num_layers} layers")
        return self.layers


@dataclass
class LoRASlot:
    """One adapted linear: views into the flat buffer and their flat offsets."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    a_offset: int
    b_offset: int


@dataclass
class LoRAAdapter:
    """A LoRA adapter for a model: `buffer` holds every parameter; `slots` are views into it."""

    config: LoRAConfig
    model_config: object  # a family config (engine/config.py's OPTConfig ...)
    buffer: torch.Tensor
    slots: dict[tuple[int, str], LoRASlot] = field(default_factory=dict)
    # The base model's path, as PEFT's adapter_config.json names it (AutoPeftModel loads it from there).
    base_model_name_or_path: str | None = None
    # The quantization of the base it was trained on (CausalLM.quantization: mode, group_size,
    # symmetric, weights), None for a dense base; MeZOTrainer sets it from its model.
    base_quantization: dict | None = None

    # Construction ---------------------------------------------------------------------------------
    @classmethod
    def empty(cls, config: LoRAConfig, model_config, device=None) -> "LoRAAdapter":
        modules = model_config.lora_modules
        bad = [m for m in config.target_modules if m not in modules]
        if bad:
            raise InputError(f"target_modules {bad} are not linears of a model of the {model_config.family!r} "
                             f"family; choose from {modules}")
        layers = config.resolved_layers(model_config.num_hidden_layers)
        sizes = []
        for layer in layers:
            for name in modules:
                if name in config.target_modules:
                    k, n = model_config.lora_shape(name)
                    sizes.append((layer, name, k, n))
        total = sum(config.r * (k + n) for _, _, k, n in sizes)
        if total >= 2**31:
            raise InputError(f"adapter has {total} parameters; the flat index space is limited to 2**31")
        buffer = torch.zeros(total, dtype=torch.float32, device=device)
        adapter = cls(config, model_config, buffer)
        off, r = 0, config.r
        for layer, name, k, n in sizes:
            a = buffer[off:off + r * k].view(r, k)
            b = buffer[off + r * k:off + r * (k + n)].view(n, r)
            adapter.slots[(layer, name)] = LoRASlot(a, b, off, off + r * k)
            off += r * (k + n)
        return adapter

    @classmethod
    def init(cls, config: LoRAConfig, model_config, device=None) -> "LoRAAdapter":
        """PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        adapter = cls.empty(config, model_config, device=device)
        gen = torch.Generator().manual_seed(int(config.seed))
        for slot in adapter.slots.values():
            bound = 1.0 / math.sqrt(slot.a.shape[1])
            a = torch.empty(slot.a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
            slot.a.copy_(a)
        return adapter

    # Introspection --------------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return self.buffer.numel()

    @property
    def lowest_layer(self) -> int:
        return min(layer for layer, _ in self.slots)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def fits(self, model_config) -> bool:
        """Whether this adapter's matrices have the shapes of `model_config`'s linears."""
        if model_config.family != self.model_config.family or \
                model_config.num_hidden_layers != self.model_config.num_hidden_layers:
            return False
        return all(model_config.lora_shape(m) == self.model_config.lora_shape(m) for m in self.config.target_modules)

    def structure(self) -> tuple:
        """What must match for two adapters to share one kernel call (same shapes and offsets)."""
        return (self.config.r, self.config.target_modules,
                self.config.resolved_layers(self.model_config.num_hidden_layers))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT key -> view, in buffer order."""
        out = {}
        for (layer, name), slot in self.slots.items():
            prefix = self.model_config.peft_prefix(layer, name)
            out[f"{prefix}.lora_A.weight"] = slot.a
            out[f"{prefix}.lora_B.weight"] = slot.b
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat tensor laid out like `buffer` (a perturbation z, say) as PEFT key -> tensor."""
        if flat.shape != self.buffer.shape:
            raise InputError(f"flat tensor has shape {tuple(flat.shape)}, the adapter {tuple(self.buffer.shape)}")
        out = {}
        for (layer, name), slot in self.slots.items():
            prefix = self.model_config.peft_prefix(layer, name)
            out[f"{prefix}.lora_A.weight"] = flat[slot.a_offset:slot.a_offset + slot.a.numel()].view_as(slot.a)
            out[f"{prefix}.lora_B.weight"] = flat[slot.b_offset:slot.b_offset + slot.b.numel()].view_as(slot.b)
        return out

    def clone(self) -> "LoRAAdapter":
        return self.to(self.device)

    def to(self, device) -> "LoRAAdapter":
        new = LoRAAdapter.empty(self.config, self.model_config, device=device)
        new.buffer.copy_(self.buffer)
        new.base_model_name_or_path = self.base_model_name_or_path
        new.base_quantization = self.base_quantization
        return new

    # PEFT format ----------------------------------------------------------------------------------
    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        layers = self.config.layers
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": int(self.config.r),
            "lora_alpha": self.config.alpha,
            "target_modules": list(self.config.target_modules),
            "layers_to_transform": list(layers) if layers is not None else None,
            "layers_pattern": None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        if self.base_quantization:
            config[BASE_QUANTIZATION_KEY] = self.base_quantization
        return config

    def save_pretrained(self, path: str, *, base_model_name_or_path: str | None = None) -> None:
        """adapter_config.json + adapter_model.safetensors with PEFT's key names (files replaced atomically).

        base_model_name_or_path: what the config names as the base model (default: this adapter's).
        """
        if base_model_name_or_path is None:
            base_model_name_or_path = self.base_model_name_or_path
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.named_tensors().items()}
        tmp = os.path.join(path, f".{ADAPTER_WEIGHTS}.tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, ADAPTER_WEIGHTS))
        tmp = os.path.join(path, f".{ADAPTER_CONFIG}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.peft_config(base_model_name_or_path), f, indent=2)
        os.replace(tmp, os.path.join(path, ADAPTER_CONFIG))

    @classmethod
    def from_pretrained(cls, path: str, model_config, *, seed: int = 0, device=None) -> "LoRAAdapter":
        """Read a PEFT LoRA adapter of a model with config `model_config` (safetensors or .bin)."""
        cfg_path = os.path.join(path, ADAPTER_CONFIG)
        if not os.path.isfile(cfg_path):
            raise InputError(f"{path}: no {ADAPTER_CONFIG}, not a PEFT adapter directory")
        try:
            with open(cfg_path) as f:
                pc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_path}: cannot be read: {e}") from e
        if not isinstance(pc, dict):
            raise InputError(f"{cfg_path}: holds a JSON {type(pc).__name__}, not an object")
        if pc.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{cfg_path}: peft_type {pc.get('peft_type')!r} is not LORA")
        for key, ok in (("bias", ("none", None)), ("use_dora", (False, None)), ("use_rslora", (False, None)),
                        ("fan_in_fan_out", (False, None))):
            if pc.get(key) not in ok:
                raise InputError(f"{cfg_path}: {key}={pc.get(key)!r} is not supported")
        for key in ("rank_pattern", "alpha_pattern"):
            if pc.get(key):
                raise InputError(f"{cfg_path}: {key} (per-module ranks or alphas) is not supported")
        targets = pc.get("target_modules")
        if not targets:
            raise InputError(f"{cfg_path}: no target_modules")
        if isinstance(targets, str):
            targets = [m for m in model_config.lora_modules if m in targets.split("|") or targets == m]
            if not targets:
                raise InputError(f"{cfg_path}: target_modules regex {pc['target_modules']!r} is not supported")
        if not isinstance(targets, (list, tuple)) or not all(isinstance(m, str) for m in targets):
            raise InputError(f"{cfg_path}: target_modules must be module names, got {json.dumps(targets)[:60]}")
        if "r" not in pc:
            raise InputError(f"{cfg_path}: no 'r' (the LoRA rank)")
        r, alpha = pc["r"], pc.get("lora_alpha", 8)
        if isinstance(r, bool) or not isinstance(r, int):
            raise InputError(f"{cfg_path}: 'r' must be an integer rank, got {json.dumps(r)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise InputError(f"{cfg_path}: 'lora_alpha' must be a number, got {json.dumps(alpha)}")
        layers = pc.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and (not isinstance(layers, list) or
                                   not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise InputError(f"{cfg_path}: layers_to_transform must be layer indices, got {json.dumps(layers)[:60]}")
        try:
            config = LoRAConfig(r=r, alpha=alpha, target_modules=tuple(targets),
                                layers=tuple(layers) if layers is not None else None, seed=seed)
        except InputError as e:
            raise InputError(f"{cfg_path}: {e}") from None
        base = pc.get("base_model_name_or_path")
        try:
            adapter = cls.empty(config, model_config, device=device)
        except InputError as e:  # an adapter of another model: say whose
            raise InputError(f"{path}: this adapter does not fit the model ({e})"
                             + (f"; it was trained on {base}" if isinstance(base, str) and base else "")) from None
        adapter.base_model_name_or_path = base if isinstance(base, str) else None
        quantization = pc.get(BASE_QUANTIZATION_KEY)
        if quantization is not None and (not isinstance(quantization, dict) or quantization.get("mode") not in
                                         ("int8", "int4")):
            raise InputError(f"{cfg_path}: {BASE_QUANTIZATION_KEY} must be an object with a mode (int8 or int4), "
                             f"got {json.dumps(quantization)[:80]}")
        adapter.base_quantization = quantization
        tensors = _read_adapter_tensors(path)
        expected = adapter.named_tensors()
        given = {_normalise_peft_key(k): v for k, v in tensors.items()}
        missing = [k for k in expected if k not in given]
        unexpected = [k for k in given if k not in expected]
        if missing or unexpected:
            raise InputError(f"{path}: adapter tensors do not match its config: missing {missing[:4]}"
                             f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{'...' if len(unexpected) > 4 else ''}")
        for k, view in expected.items():
            t = given[k]
            if tuple(t.shape) != tuple(view.shape):
                raise InputError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(view.shape)}")
            view.copy_(t.to(torch.float32))
        return adapter


def _normalise_peft_key(key: str) -> str:
    # Files written with an adapter name keep it (".lora_A.default.weight").
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, ADAPTER_WEIGHTS)
    bn = os.path.join(path, ADAPTER_WEIGHTS_BIN)
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            return load_file(st)
        if os.path.isfile(bn):
            return torch.load(bn, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"{path}: adapter weights cannot be read: {e}") from e
    raise InputError(f"{path}: neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN} found")
