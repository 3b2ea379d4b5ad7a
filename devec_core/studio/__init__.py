"""The Studio's logic, free of any UI: pools, cached decompositions, mixes, generation, export.

``app.py`` is layout and wiring only; every decision lives here so it can be tested without a
browser. The flow for one user:

  1. ``open_preset`` / ``open_custom`` load a pool of task vectors and decompose it once
     (``decompose_cached``: in-process LRU keyed by the pool's content hash and the config).
  2. ``at_tau`` re-thresholds the kept spectrum (``Decomposition.with_tau``: no SVD).
  3. ``describe`` says what is shared at this τ — and says plainly when nothing is, so DeVec
     equals vanilla task arithmetic — and ``plots`` draws it.
  4. ``build_mixes`` turns the sliders' coefficients into two mixes;
     ``generate_llm`` / ``generate_flux`` render both with the same seed, side by side.
  5. ``export_parts`` writes the unique / shared parts as LoRA files to download;
     ``download_mix`` writes the two mixes on screen as one LoRA each, settings in the metadata.

Per-user choices live in a ``Session`` (kept by the UI in ``gr.State``); shared things (loaded
pools, decompositions, base models) live in process-wide caches keyed by content, guarded by
locks. Errors the user can fix are ``StudioError`` with what to do; the UI shows them as-is.

One job per module, each importing only those above it:

  session.py        ``Session``, ``StudioError``, ``MAX_VECTORS``
  caches.py         the process-wide caches (pools, decompositions, base models) and pool keys
  toy.py            the tiny FLUX-architecture model of the style demo (paths, extras, references)
  bases.py          base models loaded once per process; read access to their unedited weights
  uploads.py        the user's files and Hub ids → task vectors (size caps, dense cut)
  pools.py          presets → task vectors; a session's pool loaded again from its source
  decomposition.py  the cached decomposition of a session and its τ
  opening.py        open a session (preset, uploads, loaded vectors); change its settings
  reports.py        what the page says: shared at this τ, scores, pool description, menus
  mixes.py          the sliders (``Coefficients``) and the two mixes they make
  generation.py     render both mixes side by side, score them; the model being edited (a third output)
  downloads.py      the parts and the mixes as LoRA files (one zip each)

Every public name is importable from ``devec_core.studio``. Settings read at call time
(``uploads.DENSE_RANK`` / ``DENSE_ENERGY``, ``toy.TOY_DIR``) are changed on their own module.
"""

from __future__ import annotations

from ..pool import MODES, Progress  # the engine's modes and progress callback (app.py reads them here)
from ..presets import get_preset
from ..synthetic import SYNTH_ANIME, SYNTH_STYLES, flux_module_shapes, synthetic_flux_pool
from ..toxicity import has_title_line, offensive_words, score_texts
from . import bases, caches, decomposition, downloads, generation, mixes, opening, pools, reports, session, share, toy, uploads
from .bases import FLUX_NEEDS, base_weights, flux_can_generate, get_flux_backend, get_llm_backend
from .caches import get_pool, pool_key, remember_pool
from .decomposition import _device_option, at_tau, check_tau, decompose_cached
from .downloads import download_mix, export_parts
from .generation import (
    EDITED_CACHE_MAX,
    GenerationJob,
    SideBySide,
    Single,
    edited_job,
    edited_labels,
    edited_mix,
    flux_job,
    generate_flux,
    generate_llm,
    generic_image_scores,
    job_backend,
    llm_job,
    render_edited,
    run_edited,
    run_job,
    score_job,
)
from .mixes import Coefficients, build_mixes, default_coefficients
from .opening import open_custom, open_preset, open_vectors, with_settings
from .pools import preset_vectors, session_pool
from .reports import Report, default_preset, describe, preset_choices, scores_markdown, session_markdown
from .session import MAX_VECTORS, REPO_ROOT, Session, StudioError, clean_message
from .toy import TOY_BASE, TOY_DIR, TOY_SEEDS, toy_reference_markdown
from .uploads import (
    DENSE_ENERGY,
    DENSE_RANK,
    MAX_UPLOAD_MB,
    UPLOAD_SUFFIXES,
    check_upload,
    custom_vectors,
    dense_cut,
    skipped_notes,
    upload_sources,
)

# The shared caches under the names tests and tools used before the split (the same objects).
_LOCK, _POOLS, _DECOMPS, _BACKENDS = caches.LOCK, caches.POOLS, caches.DECOMPS, caches.BACKENDS

__all__ = [  # every public name of the Studio, importable from here
    "clean_message",
    "share",
    "MODES",
    "Progress",
    "get_preset",
    "SYNTH_ANIME",
    "SYNTH_STYLES",
    "flux_module_shapes",
    "synthetic_flux_pool",
    "has_title_line",
    "offensive_words",
    "score_texts",
    "bases",
    "caches",
    "decomposition",
    "downloads",
    "generation",
    "mixes",
    "opening",
    "pools",
    "reports",
    "session",
    "toy",
    "uploads",
    "FLUX_NEEDS",
    "base_weights",
    "flux_can_generate",
    "get_flux_backend",
    "get_llm_backend",
    "get_pool",
    "pool_key",
    "remember_pool",
    "_device_option",
    "at_tau",
    "check_tau",
    "decompose_cached",
    "download_mix",
    "export_parts",
    "EDITED_CACHE_MAX",
    "GenerationJob",
    "SideBySide",
    "Single",
    "edited_job",
    "edited_labels",
    "edited_mix",
    "render_edited",
    "run_edited",
    "flux_job",
    "generate_flux",
    "generate_llm",
    "generic_image_scores",
    "job_backend",
    "llm_job",
    "run_job",
    "score_job",
    "Coefficients",
    "build_mixes",
    "default_coefficients",
    "open_custom",
    "open_preset",
    "open_vectors",
    "with_settings",
    "preset_vectors",
    "session_pool",
    "Report",
    "default_preset",
    "describe",
    "preset_choices",
    "scores_markdown",
    "session_markdown",
    "MAX_VECTORS",
    "REPO_ROOT",
    "Session",
    "StudioError",
    "TOY_BASE",
    "TOY_DIR",
    "TOY_SEEDS",
    "toy_reference_markdown",
    "DENSE_ENERGY",
    "DENSE_RANK",
    "MAX_UPLOAD_MB",
    "UPLOAD_SUFFIXES",
    "check_upload",
    "custom_vectors",
    "dense_cut",
    "skipped_notes",
    "upload_sources",
    "_LOCK",
    "_POOLS",
    "_DECOMPS",
    "_BACKENDS",
]
