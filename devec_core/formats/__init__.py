"""Task vectors in: LoRA files, PEFT adapter folders, DoRA adapters, full checkpoints, Hub ids.

Every source format is converted here, at the boundary, into the one internal form
(``devec_core.taskvec.TaskVector``): module name → ``LowRank`` (scale folded in) or ``Dense``.

Normalised module names (the same module of the same base has the same key in every format):
  * FLUX (diffusers, kohya/sd-scripts, XLabs, fal-Kontext, ... LoRAs): the diffusers
    ``FluxTransformer2DModel`` module path, without the ``transformer.`` prefix, e.g.
    ``"transformer_blocks.0.attn.to_q"``, ``"single_transformer_blocks.3.proj_out"``.
    Text-encoder modules (rare) keep a ``"text_encoder."`` prefix.
  * LLMs (PEFT adapters, full checkpoints): the model's module path as in
    ``model.named_modules()`` of the ``*ForCausalLM``, e.g. ``"model.layers.0.self_attn.q_proj"``
    (PEFT's ``base_model.model.`` prefix and the ``.weight`` suffix are removed).

Scaling is folded in here: a LoRA's alpha/r (rsLoRA: alpha/√r, PEFT ``rank_pattern`` /
``alpha_pattern`` and diffusers ``.alpha`` keys respected) becomes ``LowRank.scale``; kohya files
arrive pre-scaled from diffusers' converter. DoRA deltas are dense (PEFT's merge math, needs the
base weights); a full checkpoint's delta is fine-tuned − base, read one module at a time.

A PEFT adapter keeps its alpha only in ``adapter_config.json``: a PEFT-named file without it
(and without per-module ``.alpha`` keys or this project's own export header) is refused, with
how to supply the config (the folder, a zip of it, ``config=`` / ``--config``, ``alpha=`` /
``--alpha``); it is never given a silent scale.

Dense deltas (DoRA adapters, full fine-tunes) can be cut to factors as they are read
(``compress=(rank, energy)``, ``cut_dense``: a seeded randomized SVD, one module at a time), so
a pool of 7B fine-tunes is held as factors, never as dense fp32 deltas. The base weights for
those deltas come from a checkpoint (path / Hub id) or from a model already in memory
(``ModuleWeights``: no second copy). Parameters whose shape differs between base and fine-tune
(a resized vocabulary) are skipped for that vector and listed in ``meta["skipped"]``.

Zipped folders (``.zip``) are unpacked safely (``extract_zip``: no absolute paths, no ``..``,
no links, size and member caps, pickled members refused) into a private temp folder.

Formats are detected and converted by diffusers (``FluxPipeline.lora_state_dict``) and PEFT
where they parse them; this file only sniffs which one to call and normalises the names.
Pickled files (.bin/.pt/.ckpt/.pth) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.

The package, one job per module (each imports only the ones above it):

    common.py      constants, ``FormatError``, PEFT ``adapter_config.json``
    zips.py        zipped folders, unpacked safely
    files.py       a source → a local path (file, folder, zip, Hub id); tensors read; formats sniffed
    checkpoint.py  full checkpoints read lazily; dense deltas cut to factors (``cut_dense``)
    dora.py        DoRA adapters → dense deltas (PEFT's math)
    lora.py        LoRA state dicts → low-rank modules
    load.py        the entry points: ``load_task_vector``, ``load_pool``

Import from ``devec_core.formats``; the names below are its public interface.
"""

from .checkpoint import (
    CUT_OVERSAMPLE,
    CUT_POWER_ITERS,
    CUT_SEED,
    CUT_START_RANK,
    CheckpointReader,
    ModuleWeights,
    cut_dense,
    iter_checkpoint_deltas,
    load_checkpoint_deltas,
    open_base,
    randomized_svd,
)
from .common import PICKLE_SUFFIXES, SAFE_SUFFIXES, FormatError, read_adapter_config
from .dora import dora_delta, dora_deltas
from .files import Sniffed, default_name, read_state_dict, resolve_source, safetensors_keys, sniff
from .load import check_pool_contents, check_same_base, load_pool, load_task_vector, module_report
from .lora import guess_base_model, load_lora, peft_scale
from .zips import ZIP_KEEP_SUFFIXES, ZIP_MAX_MEMBERS, extract_zip, forget_zip, unpacked_zip, zip_max_bytes, zip_vectors

__all__ = [
    "CUT_OVERSAMPLE", "CUT_POWER_ITERS", "CUT_SEED", "CUT_START_RANK", "PICKLE_SUFFIXES", "SAFE_SUFFIXES",
    "ZIP_KEEP_SUFFIXES", "ZIP_MAX_MEMBERS", "CheckpointReader", "FormatError", "ModuleWeights", "Sniffed",
    "check_pool_contents", "check_same_base", "cut_dense", "default_name", "dora_delta", "dora_deltas", "extract_zip", "forget_zip",
    "guess_base_model", "iter_checkpoint_deltas", "load_checkpoint_deltas", "load_lora", "load_pool",
    "load_task_vector", "module_report", "open_base", "peft_scale", "randomized_svd", "read_adapter_config",
    "read_state_dict", "resolve_source", "safetensors_keys", "sniff", "unpacked_zip", "zip_max_bytes", "zip_vectors",
]
