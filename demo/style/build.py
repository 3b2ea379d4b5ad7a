"""Build the style demo: a tiny FLUX-architecture model trained from scratch + a pool of style LoRAs.

    python demo/style/build.py [--out assets/style_flux] [--threads 2] [--small] [--only STAGE] [--force]

Stages (each cached in ``<out>/.work`` or by its output file, so an interrupted build resumes):
  1. base        rectified-flow training of the FluxTransformer2DModel on procedural scenes
                 (demo/style/data.py) with frozen random text encoders (devec_core/toy_flux.py);
                 checkpoints every 250 steps; the EMA weights become ``<out>/model``.
  2. classifier  a small CNN that names the object class (6 classes), trained on the procedural
                 images, plain and in every single style (the "content kept" measure).
  2b. refine     phase 2 of the base: continue from phase 1's EMA weights (``.work/base1``) with a
                 higher lr and a cosine decay; the classifier's accuracy on the check prompts is
                 logged every ``monitor_every`` steps (never used to pick weights) → ``<out>/model``.
  3. check       the bar for "real": the classifier on the base model's own generations.
  4. loras       the parent style (storybook) from the base; children (palette, stripes, outline,
                 pixel) trained on base + parent merged; independent styles (mono, neon) from the
                 base. Each exported as a diffusers FLUX LoRA file ``<out>/loras/<name>.safetensors``
                 holding its whole task vector relative to the base (a child = parent ⊕ child factors,
                 rank 8 + 8, exact).
  5. refs        one reference image per style (and the base) for the app's pool description.

Fixed seeds throughout; ``--small`` is a seconds-long configuration for tests.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo.style import data as D  # noqa: E402
from devec_core import toy_flux as TF  # noqa: E402

CONFIG = {
    "version": 2,
    "seed": 0,
    "n_data": 24000,
    # version 2 (quiet-machine rebuild): twice the batch and a higher lr; 1500 + 3000 steps of 64
    # (version 1: 2000 + 2500 steps of 32 reached 79 % class accuracy on the demo's prompt form)
    "base": {"steps": 1500, "batch": 64, "lr": 1e-3, "ema": 0.999, "drop": 0.1, "ckpt_every": 250},
    "classifier": {"steps": 1200, "batch": 128, "lr": 2e-3, "n_per_style": 3000},
    # phase 2 of the base: continue from phase 1's EMA model, higher lr with a cosine decay, monitored
    "refine": {"steps": 3000, "batch": 64, "lr": 1e-3, "lr_end": 5e-5, "warmup": 100, "ema": 0.999, "drop": 0.1, "ckpt_every": 250, "monitor_every": 500},
    "check": {"per_class": 8},
    "lora": {"rank": 8, "steps": 200, "batch": 16, "lr": 2e-3, "n_data": 4000},
    "styles": {"storybook": 1, "palette": 2, "stripes": 3, "outline": 4, "mono": 6, "neon": 7},
}
SMALL = {
    "version": 1,
    "seed": 0,
    "n_data": 256,
    "base": {"steps": 6, "batch": 16, "lr": 5e-4, "ema": 0.9, "drop": 0.1, "ckpt_every": 3},
    "classifier": {"steps": 5, "batch": 32, "lr": 2e-3, "n_per_style": 32},
    "refine": {"steps": 4, "batch": 8, "lr": 1e-3, "lr_end": 1e-4, "warmup": 2, "ema": 0.9, "drop": 0.1, "ckpt_every": 2, "monitor_every": 4},
    "check": {"per_class": 1, "forms": False},
    "lora": {"rank": 2, "steps": 3, "batch": 8, "lr": 1e-3, "n_data": 32},
    "styles": {"storybook": 1, "palette": 2, "stripes": 3, "mono": 6, "neon": 7},
}
STAGES = ("base", "classifier", "refine", "check", "loras", "refs")


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# which configuration entries each stage's output depends on (a stage is rebuilt only with --force)
STAGE_KEYS = {
    "base": ("seed", "n_data", "base"),
    "classifier": ("seed", "classifier"),
    "refine": ("seed", "n_data", "base", "refine"),
    "check": ("seed", "n_data", "base", "refine", "classifier", "check"),
    "loras": ("seed", "n_data", "base", "refine", "lora", "styles"),
    "refs": ("seed", "n_data", "base", "refine", "lora", "styles"),
}


def stage_hash(cfg: dict, stage: str) -> str:
    return config_hash({k: cfg.get(k) for k in STAGE_KEYS[stage]})


def _stage_done(out: Path, stage: str) -> bool:
    return {
        "base": lambda: TF.is_toy_flux(out / "model") or (out / ".work" / "base_ckpt.pt").exists(),
        "classifier": lambda: (out / "classifier.safetensors").exists(),
        "refine": lambda: (out / ".work" / "refine.json").exists() or (out / ".work" / "refine_ckpt.pt").exists(),
        "check": lambda: (out / ".work" / "check.json").exists(),
        "loras": lambda: (out / "loras").is_dir() and any((out / "loras").iterdir()),
        "refs": lambda: (out / "refs").is_dir() and any((out / "refs").iterdir()),
    }[stage]()


def _tqdm(it, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, mininterval=5, **kw)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ---- shared pieces ----------------------------------------------------------------------------
def block_linear_names(transformer) -> list[str]:
    """Linear layers inside the double and single blocks, AdaLN modulation excluded (a usual FLUX LoRA)."""
    out = []
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".norm" not in name:
            out.append(name)
    return out


class Trainer:
    """Rectified-flow loss on the pipeline's transformer, with cached text embeddings."""

    def __init__(self, pipe, captions: list[str]):
        self.pipe = pipe
        uniq = sorted(set(captions) | {""})
        pe, pooled, tids = TF.text_embeddings(pipe, uniq)
        self.index = {c: i for i, c in enumerate(uniq)}
        self.pe, self.pooled, self.tids = pe, pooled, tids
        self.img_ids = TF.latent_image_ids(pipe)
        self.empty = self.index[""]

    def loss(self, transformer, x01: torch.Tensor, caps: list[str], g: torch.Generator, drop: float = 0.0) -> torch.Tensor:
        b = x01.shape[0]
        x0 = TF.encode_images(self.pipe, x01)
        idx = torch.tensor([self.index[c] for c in caps])
        if drop > 0:
            idx = torch.where(torch.rand(b, generator=g) < drop, torch.full_like(idx, self.empty), idx)
        t = torch.sigmoid(torch.randn(b, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = transformer(
            hidden_states=xt, timestep=t, pooled_projections=self.pooled[idx], encoder_hidden_states=self.pe[idx],
            txt_ids=self.tids, img_ids=self.img_ids, return_dict=False,
        )[0]
        return F.mse_loss(pred, noise - x0)


def _to_torch(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).contiguous()


def _resume(ck: Path, model, ema, opt, stage: str) -> dict | None:
    """Load a stage's checkpoint (model, EMA, optimiser) if there is one; its state dict, or None."""
    if not ck.exists():
        return None
    st = torch.load(ck, weights_only=True)
    model.load_state_dict(st["model"])
    ema.load_state_dict(st["ema"])
    opt.load_state_dict(st["opt"])
    print(f"[{stage}] resumed at step {int(st['step'])}", flush=True)
    return st


def _train_step(model, ema, opt, tr: "Trainer", xt: torch.Tensor, caps: list[str], g: torch.Generator, c: dict) -> float:
    """One rectified-flow step on a random batch (clipped AdamW), then the EMA update; the loss."""
    idx = torch.randint(len(caps), (c["batch"],), generator=g)
    loss = tr.loss(model, xt[idx], [caps[i] for i in idx.tolist()], g, drop=c["drop"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe_, pm in zip(ema.parameters(), model.parameters()):
            pe_.lerp_(pm, 1 - c["ema"])
    return loss.item()


# ---- stage 1: base ----------------------------------------------------------------------------
def stage_base(cfg: dict, out: Path, imgs: np.ndarray, labels: list[dict], force: bool = False) -> dict:
    model_dir = out / "model"
    if TF.is_toy_flux(model_dir) and not force:
        return json.loads((out / ".work" / "base.json").read_text()) if (out / ".work" / "base.json").exists() else {}
    c = cfg["base"]
    x = _to_torch(imgs) * 2 - 1
    scale = float(1 / x.std())
    shift = float(x.mean())
    pipe = TF.build_pipeline(seed=cfg["seed"], scaling_factor=scale, shift_factor=shift)
    caps = [lab["caption"] for lab in labels]
    tr = Trainer(pipe, caps)
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
    ck = out / ".work" / "base_ckpt.pt"
    step, losses = 0, []
    st = _resume(ck, model, ema, opt, "base") if not force else None
    if st is not None:
        step, losses = int(st["step"]), list(st["losses"])
    xt = _to_torch(imgs)
    t0 = time.time()
    for s in _tqdm(range(step, c["steps"]), desc="base", initial=step, total=c["steps"]):
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + s)
        warm = min(1.0, (s + 1) / 200)
        for pg in opt.param_groups:
            pg["lr"] = c["lr"] * warm
        losses.append(_train_step(model, ema, opt, tr, xt, caps, g, c))
        if (s + 1) % c["ckpt_every"] == 0 or s + 1 == c["steps"]:
            _atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": s + 1, "losses": losses}, ck)
            print(f"[base] step {s + 1}: loss(last {c['ckpt_every']}) {np.mean(losses[-c['ckpt_every']:]):.4f}", flush=True)
    # bias-corrected EMA (as Adam's moments): the EMA starts at the random init, which still weighs
    # d^steps (0.999^2000 = 0.14); remove it exactly — the init is rebuilt from the seed
    d, n_steps = c["ema"], c["steps"]
    init = TF.build_pipeline(seed=cfg["seed"], scaling_factor=scale, shift_factor=shift).transformer.state_dict()
    with torch.no_grad():
        corr = {k: (v - d**n_steps * init[k]) / (1 - d**n_steps) if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    ema.load_state_dict(corr)
    pipe.transformer = ema.eval()
    TF.save_model(pipe, model_dir, fp16=True)
    TF.save_model(pipe, out / ".work" / "base1", fp16=True)  # phase 1, the start of the refine stage
    info = {"seconds": round(time.time() - t0, 1), "steps": c["steps"], "final_loss": float(np.mean(losses[-100:])), "scaling_factor": scale, "shift_factor": shift,
            "parameters": sum(p.numel() for p in ema.parameters())}
    _write_json(out / ".work" / "base.json", info)
    return info


# ---- stage 2: content classifier --------------------------------------------------------------
ContentNet = TF.ContentNet
load_classifier = TF.load_classifier


def stage_classifier(cfg: dict, out: Path, force: bool = False) -> dict:
    from safetensors.torch import save_file

    path = out / "classifier.safetensors"
    info_path = out / ".work" / "classifier.json"
    if path.exists() and info_path.exists() and not force:
        return json.loads(info_path.read_text())
    c = cfg["classifier"]
    torch.manual_seed(cfg["seed"] + 11)
    xs, ys = [], []
    names = [None] + list(D.STYLES)
    for k, st in enumerate(names):
        im, mk, lab = D.scenes(c["n_per_style"], seed=1000 + k)
        xs.append(im if st is None else D.styled(st, im, mk))
        ys += [TF.CLASSES.index(lab_["cls"]) for lab_ in lab]
    x, y = _to_torch(np.concatenate(xs)), torch.tensor(ys)
    net = ContentNet()
    opt = torch.optim.AdamW(net.parameters(), lr=c["lr"])
    g = torch.Generator().manual_seed(cfg["seed"] + 12)
    t0 = time.time()
    for s in _tqdm(range(c["steps"]), desc="classifier"):
        idx = torch.randint(len(y), (c["batch"],), generator=g)
        xb = x[idx]
        # robustness to the model's own slight blur / noise
        xb = (xb + 0.03 * torch.randn(xb.shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    # held-out accuracy, plain and per style
    acc = {}
    with torch.no_grad():
        for k, st in enumerate(names):
            im, mk, lab = D.scenes(max(60, c["n_per_style"] // 10), seed=5000 + k)
            xi = _to_torch(im if st is None else D.styled(st, im, mk))
            yi = torch.tensor([TF.CLASSES.index(lab_["cls"]) for lab_ in lab])
            acc[st or "plain"] = float((net(xi).argmax(1) == yi).float().mean())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    info = {"seconds": round(time.time() - t0, 1), "heldout_accuracy": acc}
    _write_json(info_path, info)
    return info


# ---- stage 2b: refine the base (phase 2) ---------------------------------------------------------
def _lr_at(c: dict, s: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``lr`` down to ``lr_end``."""
    if s < c["warmup"]:
        return c["lr"] * (s + 1) / c["warmup"]
    frac = (s - c["warmup"]) / max(1, c["steps"] - c["warmup"])
    # a Python float: a numpy scalar in the optimiser's param_groups makes the checkpoint unloadable
    # with torch.load(weights_only=True), i.e. the stage could not resume
    return float(c["lr_end"] + 0.5 * (c["lr"] - c["lr_end"]) * (1 + np.cos(np.pi * frac)))


def _wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(float(c - h), 4), round(float(c + h), 4)]


def _class_accuracy(pipe, net, items: list[tuple[str, int, int]]) -> dict:
    imgs = TF.generate(pipe, [p for p, _, _ in items], [s for _, _, s in items])
    with torch.no_grad():
        pred = net(imgs).argmax(1)
    y = torch.tensor([c for _, c, _ in items])
    per = {cls: float((pred[y == i] == i).float().mean()) for i, cls in enumerate(TF.CLASSES)}
    return {"class_accuracy": float((pred == y).float().mean()), "per_class": per, "n": len(items)}


def stage_refine(cfg: dict, out: Path, imgs: np.ndarray | None, labels: list[dict] | None, force: bool = False) -> dict:
    """Phase 2 of the base model: continue from phase 1's EMA weights (``.work/base1``) with a higher
    lr and a cosine decay; every ``monitor_every`` steps the (bias-corrected) EMA is checked with the
    content classifier on the check prompts (logged, never used to pick weights). Writes ``<out>/model``."""
    info_path = out / ".work" / "refine.json"
    if info_path.exists() and not force:
        return json.loads(info_path.read_text())
    import shutil

    c = cfg["refine"]
    if c["steps"] == 0:  # phase 2 off: the model stays phase 1's
        info = {"seconds": 0.0, "steps": 0}
        _write_json(info_path, info)
        return info
    base1 = out / ".work" / "base1"
    if not TF.is_toy_flux(base1):
        # a model written before this stage existed is phase 1's output: keep it as the start
        shutil.copytree(out / "model", base1)
    if imgs is None:
        imgs, _, labels = D.scenes(cfg["n_data"], seed=cfg["seed"])
    pipe = TF.load_model(base1)
    caps = [lab["caption"] for lab in labels]
    tr = Trainer(pipe, caps)
    model = pipe.transformer.train()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
    net = load_classifier(out / "classifier.safetensors") if (out / "classifier.safetensors").exists() else None
    ck = out / ".work" / "refine_ckpt.pt"
    step, losses, monitor = 0, [], []
    st = _resume(ck, model, ema, opt, "refine") if not force else None
    if st is not None:
        step, losses = int(st["step"]), list(st["losses"])
        monitor = json.loads(st["monitor"])

    def corrected(n_steps: int):
        d = c["ema"] ** n_steps
        m = copy.deepcopy(ema)
        with torch.no_grad():
            m.load_state_dict({k: (v - d * init[k]) / (1 - d) if v.is_floating_point() else v for k, v in ema.state_dict().items()})
        return m.eval()

    xt = _to_torch(imgs)
    t0 = time.time()
    for s in _tqdm(range(step, c["steps"]), desc="refine", initial=step, total=c["steps"]):
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + 500_000 + s)
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(c, s)
        losses.append(_train_step(model, ema, opt, tr, xt, caps, g, c))
        if net is not None and ((s + 1) % c["monitor_every"] == 0 or s + 1 == c["steps"]):
            pipe.transformer = corrected(s + 1)
            acc = _class_accuracy(pipe, net, check_prompts(cfg["check"]["per_class"]))
            acc2 = _class_accuracy(pipe, net, check_prompts(cfg["check"]["per_class"], SHOW_SIZE, SHOW_PLACE, seed0=700))
            pipe.transformer = model
            monitor.append({"step": s + 1, "class_accuracy": acc["class_accuracy"], "sized_placed": acc2["class_accuracy"], "loss": float(np.mean(losses[-c["monitor_every"]:]))})
            print(f"[refine] step {s + 1}: class accuracy of the EMA {acc['class_accuracy']:.3f} {acc['per_class']}; "
                  f"demo form {acc2['class_accuracy']:.3f} {acc2['per_class']}", flush=True)
        if (s + 1) % c["ckpt_every"] == 0 or s + 1 == c["steps"]:
            _atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": s + 1, "losses": losses, "monitor": json.dumps(monitor)}, ck)
            print(f"[refine] step {s + 1}: loss(last {c['ckpt_every']}) {np.mean(losses[-c['ckpt_every']:]):.4f}", flush=True)
    pipe.transformer = corrected(c["steps"])
    TF.save_model(pipe, out / "model", fp16=True)
    info = {"seconds": round(time.time() - t0, 1), "steps": c["steps"], "final_loss": float(np.mean(losses[-100:])), "monitor": monitor}
    _write_json(info_path, info)
    return info


# ---- stage 3: check the base model --------------------------------------------------------------
def check_prompts(per_class: int, size: str | None = None, place: str | None = None, seed0: int = 100) -> list[tuple[str, int, int]]:
    """(prompt, class index, seed): each class in rotating colours; size/place unsaid unless given."""
    out = []
    for ci, cls in enumerate(TF.CLASSES):
        for k in range(per_class):
            out.append((TF.caption(cls, TF.COLOURS[(ci + k) % len(TF.COLOURS)], size, place), ci, seed0 + k))
    return out


# the prompt form the demo shows (refs, calibration, evaluation): the model draws the object
# recognisably far more often when the caption names its size and place (build.json "check")
SHOW_SIZE, SHOW_PLACE = "big", "middle"


def stage_check(cfg: dict, out: Path, force: bool = False) -> dict:
    """The classifier on the base model's generations: top level = prompts naming class and colour
    only ("a red house", seeds 100…); ``sized_placed`` = the demo's form ("a big red house in the
    middle") on other seeds (700…), twice as many."""
    path = out / ".work" / "check.json"
    if path.exists() and not force:
        return json.loads(path.read_text())
    pipe = TF.load_model(out / "model")
    net = load_classifier(out / "classifier.safetensors")
    t0 = time.time()
    info = _class_accuracy(pipe, net, check_prompts(cfg["check"]["per_class"]))
    info["generate_seconds"] = round(time.time() - t0, 2)
    info["sized_placed"] = _class_accuracy(pipe, net, check_prompts(2 * cfg["check"]["per_class"], SHOW_SIZE, SHOW_PLACE, seed0=700))
    info["sized_placed"]["prompt_form"] = TF.caption("house", "red", SHOW_SIZE, SHOW_PLACE)
    # fresh seeds (5000…; never seen by the refine monitor, which uses 100… and 700…): the demo's form
    # with a 95 % Wilson interval, and every caption form the training data has (size and place said
    # or unsaid), so that a reader sees where the model is and is not reliable
    if not cfg["check"].get("forms", True):  # the seconds-long test configuration
        _write_json(path, info)
        return info
    fresh = _class_accuracy(pipe, net, check_prompts(8 * cfg["check"]["per_class"], SHOW_SIZE, SHOW_PLACE, seed0=5000))
    fresh["interval95"] = _wilson(fresh["class_accuracy"], fresh["n"])
    info["fresh_demo_form"] = fresh
    forms = {}
    for size in (None,) + TF.SIZES:
        for place in (None,) + TF.PLACES:
            key = TF.caption("<object>", "<colour>", size, place)
            forms[key] = _class_accuracy(pipe, net, check_prompts(max(1, cfg["check"]["per_class"] // 2), size, place, seed0=6000))
    info["forms"] = forms
    _write_json(path, info)
    return info


# ---- stage 4: LoRAs ------------------------------------------------------------------------------
def _lora_state(transformer, adapter: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().float() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter).items()}


def _fuse_lora(transformer, sd: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """W += scale · B @ A for every module of a (prefix-free) LoRA state dict."""
    with torch.no_grad():
        for k, a in sd.items():
            if not k.endswith(".lora_A.weight"):
                continue
            mod = k[: -len(".lora_A.weight")]
            b = sd[mod + ".lora_B.weight"]
            transformer.get_submodule(mod).weight += scale * (b @ a)


def train_lora(cfg: dict, base_transformer, trainer: Trainer, x01: torch.Tensor, caps: list[str], seed: int, desc: str) -> dict[str, torch.Tensor]:
    """Train one LoRA (rank r, alpha r) on ``base_transformer`` (left untouched); return its state dict."""
    from peft import LoraConfig

    c = cfg["lora"]
    model = copy.deepcopy(base_transformer)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=c["rank"], lora_alpha=c["rank"], init_lora_weights="gaussian", target_modules=block_linear_names(model)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=0.0)
    n = len(caps)
    for s in _tqdm(range(c["steps"]), desc=desc):
        g = torch.Generator().manual_seed(seed * 1_000_003 + s)
        idx = torch.randint(n, (c["batch"],), generator=g)
        loss = trainer.loss(model, x01[idx], [caps[i] for i in idx.tolist()], g, drop=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _lora_state(model)


def concat_loras(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One LoRA equal to the sum of several (all alpha = rank): A stacked, B side by side (exact)."""
    out = {}
    mods = sorted({k[: -len(".lora_A.weight")] for p in parts for k in p if k.endswith(".lora_A.weight")})
    for m in mods:
        As = [p[m + ".lora_A.weight"] for p in parts if m + ".lora_A.weight" in p]
        Bs = [p[m + ".lora_B.weight"] for p in parts if m + ".lora_B.weight" in p]
        out[m + ".lora_A.weight"] = torch.cat(As, 0)
        out[m + ".lora_B.weight"] = torch.cat(Bs, 1)
    return out


def save_flux_lora(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """Write a diffusers FLUX LoRA file (keys ``transformer.<module>.lora_A/B.weight``, fp16)."""
    from diffusers import FluxPipeline

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.stem + ".tmpdir")
    tmp.mkdir(exist_ok=True)
    FluxPipeline.save_lora_weights(str(tmp), transformer_lora_layers={k: v.half() for k, v in sd.items()}, weight_name=path.name)
    (tmp / path.name).replace(path)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return path


def _lora_context(cfg: dict, out: Path):
    pipe = TF.load_model(out / "model")
    c = cfg["lora"]
    im, mk, lab = D.scenes(c["n_data"], seed=cfg["seed"] + 77)
    caps = [x["caption"] for x in lab]
    return pipe.transformer, Trainer(pipe, caps), im, mk, caps


def _train_style(cfg: dict, out: Path, name: str, ctx=None, threads: int | None = None) -> dict:
    """Train style ``name`` (the parent's raw factors must exist for a child) and write its file."""
    from safetensors.torch import load_file

    if threads:
        torch.set_num_threads(threads)
    base, trainer, im, mk, caps = ctx or _lora_context(cfg, out)
    c, styles = cfg["lora"], cfg["styles"]
    t0 = time.time()
    if name in D.CHILDREN:
        psd = load_file(str(out / ".work" / f"{D.PARENT}.raw.safetensors"))
        merged = copy.deepcopy(base)
        _fuse_lora(merged, psd)
        csd = train_lora(cfg, merged, trainer, _to_torch(D.styled(name, im, mk)), caps, styles[name], name)
        full, rank, parent = concat_loras([psd, csd]), 2 * c["rank"], D.PARENT
    elif name in D.INDEPENDENT:
        full, rank, parent = train_lora(cfg, base, trainer, _to_torch(D.styled(name, im, mk)), caps, styles[name], name), c["rank"], None
    else:
        raise ValueError(f"style {name!r} is neither the parent, a child ({D.CHILDREN}) nor independent ({D.INDEPENDENT})")
    save_flux_lora(full, out / "loras" / f"{name}.safetensors")
    return {"seconds": round(time.time() - t0, 1), "rank": rank, "parent": parent}


def _train_style_job(args):  # a worker process (spawned): one thread each
    cfg, out, name, threads = args
    return name, _train_style(cfg, Path(out), name, threads=threads)


def stage_loras(cfg: dict, out: Path, force: bool = False, workers: int = 1, threads: int = 1) -> dict:
    """The parent first, then children and independent styles (in ``workers`` processes if > 1;
    every LoRA has its own seed, so the result does not depend on ``workers``)."""
    from safetensors.torch import save_file

    lo = out / "loras"
    work = out / ".work"
    styles = cfg["styles"]
    todo = [s for s in styles if force or not (lo / f"{s}.safetensors").exists()]
    info_path = work / "loras.json"
    info = json.loads(info_path.read_text()) if info_path.exists() and not force else {}
    if not todo:
        return info
    c = cfg["lora"]
    parent_raw = work / f"{D.PARENT}.raw.safetensors"
    ctx = None
    if D.PARENT in styles and (force or not parent_raw.exists() or D.PARENT in todo):
        ctx = _lora_context(cfg, out)
        base, trainer, im, mk, caps = ctx
        if force or not parent_raw.exists():
            t0 = time.time()
            sd = train_lora(cfg, base, trainer, _to_torch(D.styled(D.PARENT, im, mk)), caps, styles[D.PARENT], D.PARENT)
            save_file(sd, str(parent_raw))
            info[D.PARENT] = {"seconds": round(time.time() - t0, 1), "rank": c["rank"], "parent": None}
        from safetensors.torch import load_file

        save_flux_lora(load_file(str(parent_raw)), lo / f"{D.PARENT}.safetensors")
        _write_json(info_path, info)
    rest = [n for n in todo if n != D.PARENT]
    if workers > 1 and len(rest) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            for name, inf in ex.map(_train_style_job, [(cfg, str(out), n, threads) for n in rest]):
                info[name] = inf
                _write_json(info_path, info)
    else:
        ctx = ctx or (_lora_context(cfg, out) if rest else None)
        for name in rest:
            info[name] = _train_style(cfg, out, name, ctx)
            _write_json(info_path, info)
    return info


# ---- stage 5: reference images and detector calibration ------------------------------------------
REF_PROMPTS = tuple(TF.caption(c, col, SHOW_SIZE, SHOW_PLACE) for c, col in (("house", "red"), ("boat", "blue"), ("tree", "green")))


def calibration_items(per_class: int) -> list[tuple[str, int]]:
    """(prompt, seed): every class in two colours, ``per_class`` seeds each (held apart from the check's seeds)."""
    out = []
    for ci, cls in enumerate(TF.CLASSES):
        for k in range(per_class):
            out.append((TF.caption(cls, TF.COLOURS[(ci + 2 * k) % len(TF.COLOURS)], SHOW_SIZE, SHOW_PLACE), 300 + k))
    return out


def stage_refs(cfg: dict, out: Path, force: bool = False) -> dict:
    """Reference strips (refs/<name>.png) and each detector's level on base and single-style images
    (calibration.json: what the app's style scores are relative to; AUROC styled vs base)."""
    from PIL import Image

    from devec_core import style_metrics as M
    from devec_core.backends.flux import FluxBackend
    from devec_core.formats import load_task_vector
    from devec_core.mix import VectorPool, vanilla

    rd = out / "refs"
    names = ["base"] + list(cfg["styles"])
    cal_path = out / TF.CALIBRATION
    if all((rd / f"{n}.png").exists() for n in names) and cal_path.exists() and not force:
        return json.loads(cal_path.read_text()).get("summary", {})
    rd.mkdir(parents=True, exist_ok=True)
    backend = FluxBackend(TF.load_model(out / "model"))
    items = calibration_items(cfg["check"]["per_class"])
    feats = {}
    for n in names:
        mix = None
        if n != "base":
            tv = load_task_vector(str(out / "loras" / f"{n}.safetensors"), name=n)
            mix = vanilla(VectorPool([tv]), {n: 1.0}, label=n)
        backend.apply(mix)
        ims = TF.generate(backend.pipe, list(REF_PROMPTS), [0] * len(REF_PROMPTS))
        arr = (torch.cat(list(ims), dim=2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(rd / f"{n}.png")
        cal = TF.generate(backend.pipe, [p for p, _ in items], [sd for _, sd in items]).permute(0, 2, 3, 1).numpy()
        feats[n] = {d: np.atleast_1d(f(cal)) for d, f in M.DETECTORS.items()}
    backend.restore()
    styles = [n for n in names if n != "base"]
    cal = {
        "base": {d: float(v.mean()) for d, v in feats["base"].items()},
        "single": {s: {d: float(v.mean()) for d, v in feats[s].items()} for s in styles},
        "auroc": {s: M.auroc(feats[s][s], feats["base"][s]) for s in styles if s in M.DETECTORS},
        "n_per_side": len(items),
    }
    cal["summary"] = {"refs": names, "auroc_generated": cal["auroc"]}
    _write_json(cal_path, cal)
    return cal["summary"]


# ---- driver ----
def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---- driver --------------------------------------------------------------------------------------
def build(out: str | Path = ROOT / "assets" / "style_flux", cfg: dict | None = None, threads: int | None = None, only: list[str] | None = None, force: bool = False, workers: int = 1) -> dict:
    """Run the stages (cached) and write ``<out>/build.json``. Returns its content."""
    cfg = cfg or CONFIG
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    (out / ".work").mkdir(parents=True, exist_ok=True)
    h = config_hash(cfg)
    only = list(only or STAGES)
    for s in only:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; expected some of {STAGES}")
    stamp = out / ".work" / "config.json"
    if stamp.exists() and not force:
        old = json.loads(stamp.read_text()).get("config", {})
        changed = [s for s in only if stage_hash(old, s) != stage_hash(cfg, s) and _stage_done(out, s)]
        if changed:
            raise RuntimeError(f"{out}: stages {changed} were built with a different configuration; use --force or another --out")
    _write_json(stamp, {"hash": h, "config": cfg})
    report = {"config_hash": h, "config": cfg}
    if (out / "build.json").exists():
        report.update(json.loads((out / "build.json").read_text()))
    imgs = labels = None
    for s in STAGES:
        if s not in only:
            continue
        t0, c0 = time.time(), _cpu_seconds()
        print(f"[build] stage {s}", flush=True)
        if s == "base":
            if not TF.is_toy_flux(out / "model") or force:
                imgs, _, labels = D.scenes(cfg["n_data"], seed=cfg["seed"])
            report["base"] = stage_base(cfg, out, imgs, labels, force) or report.get("base", {})
        elif s == "classifier":
            report["classifier"] = stage_classifier(cfg, out, force)
        elif s == "refine":
            report["refine"] = stage_refine(cfg, out, imgs, labels, force)
        elif s == "check":
            report["check"] = stage_check(cfg, out, force)
        elif s == "loras":
            report["loras"] = stage_loras(cfg, out, force, workers=workers, threads=threads or 1)
        elif s == "refs":
            report["refs"] = stage_refs(cfg, out, force)
        wall, cpu = time.time() - t0, _cpu_seconds() - c0
        print(f"[build] stage {s} done in {wall:.1f} s wall, {cpu:.1f} s CPU (this process and its workers)", flush=True)
        report.setdefault("timing", {})[s] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_average": [round(v, 2) for v in os.getloadavg()]}
        report["config_hash"], report["config"] = h, cfg
        _write_json(out / "build.json", report)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "assets" / "style_flux"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="seconds-long configuration (tests)")
    ap.add_argument("--only", nargs="*", choices=STAGES)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--workers", type=int, default=1, help="processes for the LoRAs after the parent (each --threads threads)")
    a = ap.parse_args(argv)
    rep = build(a.out, SMALL if a.small else CONFIG, a.threads, a.only, a.force, a.workers)
    print(json.dumps({k: v for k, v in rep.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
