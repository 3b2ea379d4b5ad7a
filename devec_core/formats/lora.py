"""LoRA state dicts (PEFT, diffusers, kohya, XLabs, ...) → modules of low-rank factors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..taskvec import Delta, LowRank, TaskVector
from .common import _LORA_MARKERS, FormatError, _no_alpha
from .dora import dora_deltas
from .files import read_state_dict


def peft_scale(config: dict, module: str, rank: int) -> float:
    """The LoRA scale of one module under a PEFT ``LoraConfig`` dict (alpha/r or rsLoRA alpha/√r).

    Uses PEFT's own pattern matching for ``rank_pattern`` / ``alpha_pattern``.

    Args:
        config: LoraConfig fields (adapter_config.json, or diffusers' lora_adapter_metadata).
        module: the module path as PEFT's tuner sees it (e.g. "model.layers.0.self_attn.q_proj").
        rank: the module's actual rank (rows of lora_A).
    Returns:
        The factor s with ΔW = s · B A.
    """
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha", config.get("r", rank)) or rank
    alpha_pattern = config.get("alpha_pattern") or {}
    if alpha_pattern:
        key = get_pattern_key(list(alpha_pattern), module)
        alpha = alpha_pattern.get(key, alpha)
    r = rank
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(r)
    return float(alpha) / r


def _is_peft_keys(keys: list[str]) -> bool:
    """PEFT naming (``base_model.model.<module>.lora_A.weight``), not fal-Kontext's BFL names."""
    return bool(keys) and all(k.startswith("base_model.model.") for k in keys) and not any(
        ".double_blocks." in k or ".single_blocks." in k for k in keys
    )


def _flux_format_label(keys: list[str]) -> str:
    """The label of the layout diffusers' ``FluxPipeline.lora_state_dict`` will detect (its own tests)."""
    if any(".lora_down.weight" in k for k in keys):
        return "kohya"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any("base_model" in k for k in keys):
        return "fal-kontext"
    return "diffusers"


def _unknown_layout(path: Path, keys: list[str], why: str) -> FormatError:
    shown = ", ".join(repr(k) for k in keys[:5])
    return FormatError(f"{str(path)!r}: unknown key layout ({why}); first keys: {shown}{' ...' if len(keys) > 5 else ''}")


def _group_lora(
    sd: dict[str, torch.Tensor], path: Path, display: Callable[[str], str] = lambda k: k
) -> dict[str, dict[str, torch.Tensor]]:
    """``<module>.lora_A.weight`` style keys → module → {"A", "B", "alpha", "magnitude", "bias"}.

    ``display`` maps a key back to how the file spells it, for error messages.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    leftovers = []
    patterns = (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_B.bias", "bias"),
        (".lora_magnitude_vector.weight", "magnitude"),
        (".lora_magnitude_vector", "magnitude"),
        (".alpha", "alpha"),
    )
    for k, v in sd.items():
        for suf, part in patterns:
            if k.endswith(suf):
                groups.setdefault(k[: -len(suf)], {})[part] = v
                break
        else:
            leftovers.append(k)
    if leftovers:
        raise _unknown_layout(path, [display(k) for k in leftovers], f"{len(leftovers)} keys are not LoRA factors")
    for mod, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise FormatError(f"{str(path)!r}: module {mod!r} has no {missing} weight")
        A, B = parts["A"], parts["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise FormatError(
                f"{str(path)!r}: module {mod!r}: only linear LoRAs are supported; lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
            )
        if B.shape[1] != A.shape[0]:
            raise FormatError(f"{str(path)!r}: module {mod!r}: lora_B {tuple(B.shape)} does not match lora_A {tuple(A.shape)}")
    return groups


def _lora_modules(
    groups: dict[str, dict[str, torch.Tensor]], scale_of: Callable[[str, int], float], dtype: torch.dtype
) -> tuple[dict[str, Delta], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Groups → (LowRank modules, extras (lora_B biases), DoRA magnitudes)."""
    modules: dict[str, Delta] = {}
    extras: dict[str, torch.Tensor] = {}
    mags: dict[str, torch.Tensor] = {}
    for mod, parts in groups.items():
        A, B = parts["A"].to(dtype), parts["B"].to(dtype)
        r = A.shape[0]
        if "alpha" in parts:  # diffusers / kohya-style per-module alpha
            scale = float(parts["alpha"]) / r
        else:
            scale = scale_of(mod, r)
        modules[mod] = LowRank(B.contiguous(), A.contiguous(), scale)
        if "bias" in parts:
            extras[mod + ".bias"] = parts["bias"].to(dtype) * scale
        if "magnitude" in parts:
            mags[mod] = parts["magnitude"].to(dtype)
    return modules, extras, mags


def _flux_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str], path: Path):
    """Any FLUX LoRA layout → (diffusers keys without prefix per component, alphas, config, label).

    Calls ``FluxPipeline.lora_state_dict`` (diffusers' own detection and converters).
    """
    from diffusers import FluxPipeline  # lazy: heavy

    keys = list(sd)
    label = _flux_format_label(keys)
    try:
        out, alphas = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:  # what its converters raise on a layout they do not know
        raise _unknown_layout(path, keys, f"diffusers' FLUX converter ({label}) failed: {type(e).__name__}: {str(e)[:160]}") from e
    out = dict(out)
    for k, v in (alphas or {}).items():
        out[k] = v
    added = bool(out) and not any(k.startswith(("transformer.", "text_encoder.")) for k in out)
    if added:
        out = {"transformer." + k: v for k, v in out.items()}  # older diffusers files: no prefix
    bad = [k for k in out if not k.startswith(("transformer.", "text_encoder."))]
    if bad:
        raise _unknown_layout(path, bad, "not a FLUX transformer/text-encoder key")
    config = None
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            full = json.loads(raw)
            config = {k.removeprefix("transformer."): v for k, v in full.items() if k.startswith("transformer.")} or full
        except json.JSONDecodeError:
            config = None
    return out, config, label, (lambda k: k.removeprefix("transformer.")) if added else (lambda k: k)


def _strip_component(groups: dict, prefix: str) -> dict:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in groups.items()}


def load_lora(
    path: Path, config: dict | None, *, name: str, base, allow_pickle: bool, dtype: torch.dtype,
    alpha: float | None = None, compress: tuple[int | None, float | None] | None = None,
) -> TaskVector:
    """A LoRA file (any FLUX layout, or PEFT naming) → TaskVector. DoRA needs ``base``.

    A PEFT-named file needs its alpha: from ``config`` (adapter_config.json), per-module
    ``.alpha`` keys, this project's export header (scale folded in, alpha = r) or ``alpha``
    (one lora_alpha for every module); otherwise it is refused (``_no_alpha``).
    """
    sd, meta = read_state_dict(path, allow_pickle=allow_pickle)
    if not sd:
        raise FormatError(f"{str(path)!r}: the file holds no tensors")
    keys = list(sd)
    if not any(m in k for k in keys for m in _LORA_MARKERS) and not any(".processor." in k for k in keys):
        raise _unknown_layout(path, keys, "no LoRA factor keys (lora_A/lora_B, lora_down/lora_up)")

    if config is not None or _is_peft_keys(keys):
        # PEFT naming: base_model.model.<module>.lora_A.weight (LLMs, or any PEFT-wrapped model)
        fmt = "peft"
        stripped = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
        groups = _group_lora(stripped, path)
        if config is None and alpha is None and not any(k.endswith(".alpha") for k in keys):
            if "devec" not in meta:  # this project's exports fold the scale into B (alpha = r)
                raise _no_alpha(path)
        cfg = dict(config or {})
        if config is None and alpha is not None:
            if not math.isfinite(float(alpha)):
                raise FormatError(f"{str(path)!r}: alpha must be a finite number; got {alpha!r}")
            cfg = {"lora_alpha": float(alpha)}
        scale_of = lambda mod, r: peft_scale(cfg, mod, r)  # noqa: E731
        family = "flux" if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in groups) else "llm"
        if family == "flux" and config is None:
            fmt = "peft"  # exported back as a PEFT folder
    else:
        out, cfg, fmt, display = _flux_state_dict(sd, meta, path)
        groups = _group_lora(out, path, display)
        groups = _strip_component(groups, "transformer.")
        cfg = cfg or {}
        family = "flux"
        if cfg:
            scale_of = lambda mod, r: peft_scale(cfg, mod, r)  # noqa: E731
        else:
            scale_of = lambda mod, r: 1.0  # noqa: E731  diffusers: no alpha → scale 1

    modules, extras, mags = _lora_modules(groups, scale_of, dtype)
    tv_meta = {
        "format": fmt,
        "family": family,
        "source": str(path),
        "config": cfg if fmt == "peft" else None,
        "base_model": guess_base_model(family, modules, cfg),
        "dora": bool(mags),
    }
    if mags:
        if base is None:
            raise FormatError(
                f"{str(path)!r}: DoRA adapter ({len(mags)} modules with lora_magnitude_vector): its delta depends on "
                f"the base weights; pass base=... / --base MODEL"
            )
        modules = dora_deltas(modules, mags, base, dtype=dtype, source=path, compress=compress)
    return TaskVector(name, modules, extras, tv_meta)


def guess_base_model(family: str, modules: dict[str, Delta], config: dict | None) -> str:
    """A human guess of the base model (from the adapter config, else from shapes)."""
    if config and config.get("base_model_name_or_path"):
        return str(config["base_model_name_or_path"])
    if family == "flux":
        q = modules.get("transformer_blocks.0.attn.to_q")
        dims = {d.shape[1] for m, d in modules.items() if m.endswith("attn.to_q")}
        if 3072 in dims or (q is not None and q.shape == (3072, 3072)):
            return "FLUX.1 (dev/schnell): hidden 3072"
        return f"FLUX-like transformer (hidden {sorted(dims)[0] if dims else '?'})"
    hid = {d.shape[1] for m, d in modules.items() if m.endswith("q_proj")}
    return f"LLM (hidden {sorted(hid)[0]})" if hid else "unknown"
