"""A tiny text-to-image model with FLUX's architecture, trained here from scratch (the style demo).

Every image goes through the code path real FLUX uses: ``diffusers.FluxPipeline`` with a
``FluxTransformer2DModel`` (2 double + 2 single blocks, hidden 128, ~1.8M parameters), CLIP and
T5 text encoders (tiny, frozen at a seeded random init), a word-level tokenizer built in memory,
and a stand-in "VAE" that is an exact pixel_unshuffle(2): 32×32×3 pixels ↔ 16×16×12 latents,
which the pipeline packs into 8×8 = 64 tokens of 48 channels. Built by ``demo/style/build.py``.

Public API:
    VOCAB, CLASSES, COLOURS, SIZES, PLACES         the caption language
    caption(cls, colour, size=None, place=None)    -> "a big red house on the left"
    PixelUnshuffleVAE(scaling_factor, shift_factor) the stand-in VAE (encode/decode, exact)
    build_tokenizer() -> PreTrainedTokenizerFast    word level, max 8 tokens, "</s>" appended
    build_pipeline(seed=0, transformer_kwargs=None, scaling_factor=1.0, shift_factor=0.0)
        -> FluxPipeline (fresh, untrained transformer; frozen random text encoders)
    save_model(pipe, folder, fp16=True) / load_model(folder, dtype=torch.float32) -> FluxPipeline
    is_toy_flux(folder) -> bool                     a folder written by save_model
    GEN                                             the generation settings the model was trained for
                                                    (32×32, 24 steps, true CFG 5, max_sequence_length 8)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

CLASSES = ("house", "tree", "boat", "fish", "star", "cup")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SIZES = ("small", "big")
PLACES = ("left", "right", "top", "bottom", "middle")
SPECIALS = ("<pad>", "</s>", "<unk>")
VOCAB = SPECIALS + ("a", "on", "at", "in", "the") + SIZES + COLOURS + CLASSES + PLACES
MAX_TOKENS = 8
RES = 32
# 24 steps at true CFG 5: on the version-1 model, the demo's prompt form was recognised in 79 % of
# generations at (16, 3.0) and 87 % at (32, 5.0) — build.json "check" records the model's own numbers
GEN = {"width": RES, "height": RES, "num_inference_steps": 24, "true_cfg_scale": 5.0, "negative_prompt": "", "max_sequence_length": MAX_TOKENS}
TRANSFORMER = dict(
    patch_size=1,
    in_channels=48,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
MARKER = "toy_flux.json"


def caption(cls: str, colour: str, size: str | None = None, place: str | None = None) -> str:
    """The training caption: "a [size] colour class [on the left|at the top|in the middle]"."""
    words = ["a"] + ([size] if size else []) + [colour, cls]
    if place in ("left", "right"):
        words += ["on", "the", place]
    elif place in ("top", "bottom"):
        words += ["at", "the", place]
    elif place == "middle":
        words += ["in", "the", "middle"]
    elif place is not None:
        raise ValueError(f"place must be one of {PLACES}; got {place!r}")
    return " ".join(words)


def build_tokenizer():
    """Word-level tokenizer over VOCAB (lower-cased, unknown words → <unk>), "</s>" appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_TOKENS)
    return tok


def _vae_class():
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class PixelUnshuffleVAE(ModelMixin, ConfigMixin):
        """Exact stand-in VAE: pixels [-1, 1] (B,3,H,W) ↔ latents (B,12,H/2,W/2) by pixel_unshuffle(2).

        ``block_out_channels=(3, 3)`` makes FluxPipeline's ``vae_scale_factor`` 2; latents are
        normalised with ``(z - shift) * scale`` like a real FLUX VAE's.
        """

        @register_to_config
        def __init__(self, scaling_factor: float = 1.0, shift_factor: float = 0.0, block_out_channels=(3, 3), latent_channels: int = 12):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives .dtype/.device

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return F.pixel_unshuffle(x, 2)

        def decode(self, z: torch.Tensor, return_dict: bool = True):
            x = F.pixel_shuffle(z.to(self.dummy.dtype), 2)
            return (x,) if not return_dict else {"sample": x}

    return PixelUnshuffleVAE


_VAE = None


def PixelUnshuffleVAE(*args, **kwargs):  # noqa: N802 - a class factory (diffusers imported lazily)
    global _VAE
    if _VAE is None:
        _VAE = _vae_class()
    return _VAE(*args, **kwargs)


def _text_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    ids = {w: i for i, w in enumerate(VOCAB)}
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS, projection_dim=64, pad_token_id=ids["<pad>"], bos_token_id=ids["<pad>"],
            eos_token_id=ids["</s>"],
        )
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCAB), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


def _assemble(transformer, clip, t5, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    tok = build_tokenizer()
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=build_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(seed: int = 0, transformer_kwargs: dict | None = None, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """A fresh pipeline: transformer initialised from ``seed`` (train it), frozen text encoders."""
    from diffusers import FluxTransformer2DModel

    clip, t5 = _text_encoders(seed)
    torch.manual_seed(seed + 1)
    tr = FluxTransformer2DModel(**{**TRANSFORMER, **(transformer_kwargs or {})})
    vae = PixelUnshuffleVAE(scaling_factor=float(scaling_factor), shift_factor=float(shift_factor))
    return _assemble(tr, clip, t5, vae)


def save_model(pipe, folder: str | Path, fp16: bool = True) -> Path:
    """Write transformer, text encoders and VAE config to ``folder`` (safetensors, fp16 by default)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dt = torch.float16 if fp16 else None
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name)
        sd_dtype = next(m.parameters()).dtype
        if dt is not None:
            m.to(dt)
        m.save_pretrained(folder / name, safe_serialization=True)
        m.to(sd_dtype)
        cfg_path = folder / name / "config.json"
        meta = json.loads(cfg_path.read_text())
        if meta.pop("_name_or_path", None) is not None:  # where it was loaded from: a local path, not part of the model
            cfg_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (folder / MARKER).write_text(json.dumps({"vae": dict(pipe.vae.config), "vocab": list(VOCAB), "gen": GEN}, indent=1, default=list))
    return folder


def is_toy_flux(folder) -> bool:
    """True if ``folder`` holds a model written by ``save_model``."""
    try:
        return (Path(folder) / MARKER).is_file()
    except (TypeError, OSError):
        return False


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a model saved by ``save_model`` as a FluxPipeline (eval mode, CPU, ``dtype``)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    folder = Path(folder)
    if not is_toy_flux(folder):
        raise FileNotFoundError(f"no toy FLUX model in {str(folder)!r} (missing {MARKER}); build it with: python demo/style/build.py")
    meta = json.loads((folder / MARKER).read_text())
    if tuple(meta.get("vocab", ())) != VOCAB:
        raise ValueError(f"{folder}: the model's vocabulary differs from this code's VOCAB; rebuild it")
    tr = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).eval()
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).eval()
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype).eval()
    v = meta["vae"]
    vae = PixelUnshuffleVAE(scaling_factor=v["scaling_factor"], shift_factor=v["shift_factor"]).to(dtype)
    return _assemble(tr, clip, t5, vae)


def encode_images(pipe, x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B,3,32,32) → packed, normalised latents (B, 64, 48) as the transformer sees them."""
    cfg = pipe.vae.config
    z = (pipe.vae.encode(x01 * 2 - 1) - cfg.shift_factor) * cfg.scaling_factor
    b, c, h, w = z.shape
    return pipe._pack_latents(z, b, c, h, w)


@torch.no_grad()
def text_embeddings(pipe, prompts: list[str]):
    """(prompt_embeds (B,8,64), pooled (B,64), text_ids) for ``prompts`` (no grad)."""
    pe, pooled, tids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=MAX_TOKENS, device="cpu")
    return pe, pooled, tids


def latent_image_ids(pipe, n_side: int = RES // 4):
    return pipe._prepare_latent_image_ids(1, n_side, n_side, torch.device("cpu"), torch.float32)


def generate(pipe, prompts, seeds, cfg: float | None = None, steps: int | None = None) -> torch.Tensor:
    """Images (B,3,32,32) in [0,1] for ``prompts`` with one generator per seed (batched pipeline call);
    ``cfg``/``steps`` default to GEN's."""
    cfg = GEN["true_cfg_scale"] if cfg is None else cfg
    steps = GEN["num_inference_steps"] if steps is None else steps
    if isinstance(prompts, str):
        prompts = [prompts]
    seeds = list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(
            prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=cfg, num_inference_steps=steps,
            width=RES, height=RES, generator=gens, max_sequence_length=MAX_TOKENS, output_type="pt",
        ).images
    return out.float().clamp(0, 1)


class ContentNet(torch.nn.Module):
    """Small CNN: 32×32 RGB in [0,1] → logits over the 6 classes (the "content kept" measure)."""

    def __init__(self, n: int = len(CLASSES)):
        super().__init__()
        self.f = torch.nn.Sequential(
            torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(24, 48, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(48, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(256, n),
        )

    def forward(self, x):
        return self.f(x * 2 - 1)


def load_classifier(path: str | Path) -> ContentNet:
    """The content classifier written by the builder (safetensors; never a pickle)."""
    from safetensors.torch import load_file

    net = ContentNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def prompt_class(prompt: str) -> str | None:
    """The first class word in ``prompt`` (None if it names none)."""
    for w in str(prompt).lower().replace(",", " ").split():
        if w in CLASSES:
            return w
    return None


# ---- the Studio's view of the toy model: image strips and per-image scores -----------------------
CALIBRATION = "calibration.json"
SHOW_SCALE = 6


def strip(images: torch.Tensor, scale: int = SHOW_SCALE, gap: int = 4):
    """(N,3,32,32) in [0,1] → one PIL image: the N images upscaled ``scale``× (nearest), side by side."""
    from PIL import Image

    import numpy as np

    n = images.shape[0]
    side = images.shape[-1] * scale
    canvas = Image.new("RGB", (n * side + (n - 1) * gap, side), (255, 255, 255))
    for i in range(n):
        arr = (images[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(arr).resize((side, side), Image.NEAREST), (i * (side + gap), 0))
    return canvas


def load_calibration(folder: str | Path) -> dict:
    """Detector levels of the base model and of each single style (written by the builder's refs stage)."""
    p = Path(folder) / CALIBRATION
    if not p.is_file():
        raise FileNotFoundError(f"no {CALIBRATION} in {str(folder)!r}; rebuild with: python demo/style/build.py")
    return json.loads(p.read_text())


def score_images(images: torch.Tensor, prompt: str, styles: list[str], calibration: dict, classifier=None) -> dict[str, float]:
    """Scores of a batch of generations of one prompt (means over the batch).

    ``style:<name>``: the style's detector relative to its calibration, 0 = the base model's level,
    1 = the single style at λ = 1 (above 1 = stronger than the single LoRA);
    ``content``: the classifier's probability of the prompted class (if the prompt names one);
    ``clipped``: fraction of channel values at 0 or 1.
    """
    import numpy as np

    from . import style_metrics as M

    x = images.permute(0, 2, 3, 1).clamp(0, 1).numpy()
    out: dict[str, float] = {}
    for s in styles:
        det = M.DETECTORS.get(s)
        cal_b = calibration.get("base", {}).get(s)
        cal_s = calibration.get("single", {}).get(s, {}).get(s)
        if det is None or cal_b is None or cal_s is None:
            continue
        v = float(np.mean(det(x)))
        out[f"style:{s}"] = float(M.relative_strength(v, cal_b, cal_s))
    cls = prompt_class(prompt)
    if classifier is not None and cls is not None:
        with torch.no_grad():
            p = torch.softmax(classifier(images.float()), 1)[:, CLASSES.index(cls)]
        out["content"] = float(p.mean())
    out["clipped"] = float(np.mean(M.clipping(x)))
    return out
