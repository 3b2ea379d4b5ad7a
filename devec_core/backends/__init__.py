"""Backends: a model that a mix (``devec_core.mix``) can be fused into, and that renders outputs.

Two plain files, the same verbs:
    devec_core.backends.flux.FluxBackend   diffusers FluxPipeline, text → image
    devec_core.backends.llm.LLMBackend     transformers causal LM (LLaMA family), chat → text

    b.apply(mix) -> ApplyStats          fuse (only changed modules are rewritten)
    b.restore() -> int                  bit-identical base weights
    b.generate(prompt, **settings)      with the weights now fused
    b.render(prompt, mix, **settings)   apply + generate atomically (per-instance lock)
    b.side_by_side(prompt, mixes, **settings) -> list of results, same seed and settings

Import the submodule you need (``from devec_core.backends.llm import LLMBackend``); nothing heavy
is imported here.
"""
