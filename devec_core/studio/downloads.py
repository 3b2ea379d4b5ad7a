"""Downloads: the unique / shared parts at the session's τ (``export_parts``) and the two mixes on
screen as one exact LoRA each (``download_mix``); each comes as one zip plus the loose FLUX
``.safetensors`` files (a browser downloads files, and PEFT adapters are folders).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..export import export_decomposition, export_family, safe_filename
from ..merge.studio_mix import left_label, write_mix
from .decomposition import decompose_cached
from .mixes import Coefficients, build_mixes
from .session import Session, StudioError


def _new_folder(out_dir: str | Path | None, prefix: str, name: str) -> Path:
    """``out_dir/name`` (``out_dir``: a fresh temporary folder when None), created."""
    folder = Path(out_dir or tempfile.mkdtemp(prefix=prefix)) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _zip_with_files(folder: Path, written: list[Path]) -> list[Path]:
    """[zip of ``folder`` beside it, then the written paths that are files] (folders — PEFT
    adapters — are downloadable only inside the zip)."""
    zipped = Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
    return [zipped] + [p for p in written if p.is_file()]


def export_parts(session: Session, out_dir: str | Path | None = None) -> list[Path]:
    """Write the unique / shared parts at the session's τ as LoRAs, plus one zip of them all.

    Uses ``devec_core.export.export_decomposition``: FLUX pools give diffusers ``.safetensors``
    files, LLM pools PEFT adapter folders (zipped, since a browser downloads files).

    Returns:
        [zip of everything, then each FLUX .safetensors file] (LLM: just the zip).
    """
    dec = decompose_cached(session)
    parts = _new_folder(out_dir, "devec_export_", f"devec-{session.mode}-tau{dec.tau:.2f}")
    try:
        written = export_decomposition(dec, parts)
    except ValueError as e:
        raise StudioError(f"export failed: {e}") from e
    if not written:
        raise StudioError("nothing to export: every part is zero")
    return _zip_with_files(parts, written)


def download_mix(session: Session, c: Coefficients, out_dir: str | Path | None = None) -> list[Path]:
    """"Download this mix": the two mixes on screen (left method, DeVec) as one exact LoRA each,
    the sliders' settings in their metadata (header key ``"devec"``; PEFT: ``devec_mix.json``).

    Returns:
        [zip of both, then each FLUX .safetensors file] (LLM: just the zip of the PEFT folders).
    """
    dec = decompose_cached(session)
    van, dv = build_mixes(dec, c, session.pool_key)
    family = export_family([v.meta for v in dec.vectors])
    settings = {
        "backend": session.backend, "base": session.base, "names": list(session.names), "mode": session.mode,
        "tau": dec.tau, "target": session.target, "vanilla": c.vanilla, "unique": c.unique, "shared": c.shared,
        "pairs": c.pairs, "left_method": c.left, "density": c.density, "source": list(session.source or ()),
    }
    folder = _new_folder(out_dir, "devec_mix_", f"devec-mix-{session.mode}-tau{dec.tau:.2f}")
    base_config = {"base_model_name_or_path": session.base, "task_type": "CAUSAL_LM"} if family == "peft" else None
    written = []
    for side, mix in (("left-" + safe_filename(left_label(c.left)), van), ("devec", dv)):
        if not mix.terms:
            continue
        stem = folder / (side if family == "peft" else f"{side}.safetensors")
        try:
            written.append(write_mix(mix, stem, family, {**settings, "side": side}, base_config))
        except ValueError as e:
            raise StudioError(f"download failed: {e}") from e
    if not written:
        raise StudioError("nothing to download: every coefficient is 0")
    return _zip_with_files(folder, written)

