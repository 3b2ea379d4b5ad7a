"""Tiny models built offline, for tests and benches. Nothing here touches the network.

Public API (import from ``tests.tiny_models``):

    tiny_flux_pipeline(seed=0) -> diffusers.FluxPipeline
        Tiny FluxTransformer2DModel (1 double + 1 single block, hidden 32), tiny CLIP and T5
        text encoders with tokenizers built in memory, tiny AutoencoderKL,
        FlowMatchEulerDiscreteScheduler. Every model is in eval mode, float32, on the CPU.
        2 steps at 32×32 take well under a second.
    tiny_llama(seed=0) -> (LlamaForCausalLM, tokenizer)
        Tiny Llama (2 layers, hidden 32, vocab = the tokenizer's 259) and a byte-level BPE tokenizer built in memory,
        with a chat template. Eval mode, float32, CPU.
    flux_linear_modules(transformer) / llama_linear_modules(model) -> {module path: (out, in)}
    random_flux_lora(transformer, rank=4, seed=0, modules=None, scale=0.1) -> dict[str, Tensor]
        diffusers-format FLUX LoRA: keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``
        (load with ``pipe.load_lora_weights(sd, adapter_name=...)``; alpha = rank, i.e. scale 1).
    random_llama_lora(model, rank=4, seed=0, modules=None, scale=0.1) -> dict[str, Tensor]
        PEFT-format Llama LoRA: keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``.
    llama_lora_config(rank=4, modules=None) -> peft.LoraConfig matching random_llama_lora (alpha = rank).
    lora_to_taskvector(sd, name, prefix) -> devec_core.TaskVector (module paths without prefix)
    peft_folder(path, sd, **LoraConfig kwargs) -> path   a PEFT adapter folder on disk
    shared_flux_pair(transformer, folder) -> [a, b]      two FLUX LoRA files sharing one direction
    dora_folder(model, folder, targets) -> (folder, PEFT's merged weights)   a DoRA adapter on disk

All builders are deterministic in ``seed``.
"""

from __future__ import annotations

import torch

FLUX_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- tokenizers, in memory -------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte → unicode table (256 printable characters), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_clip_tokenizer():
    """A CLIPTokenizer with a byte-level vocab (every byte, with and without ``</w>``), no merges."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    return tok


def tiny_t5_tokenizer():
    """A T5Tokenizer over a small Unigram vocab: specials, letters, digits, a few words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words = "a the cat dog photo of in style pixel art painting red blue".split()
    pieces += [("▁" + w, -3.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def tiny_llama_tokenizer():
    """Byte-level BPE (256 bytes + 3 specials, no merges) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --- models ----------------------------------------------------------------------------------
def tiny_flux_pipeline(seed: int = 0):
    """A complete tiny diffusers FluxPipeline (CPU, float32, eval), deterministic in ``seed``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=32,
        )
    ).eval()
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_llama(seed: int = 0):
    """A tiny LlamaForCausalLM (CPU, float32, eval) and its in-memory chat tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_llama_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Untrained weights give near-uniform logits; scale the head so greedy picks are well separated
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# --- LoRAs -----------------------------------------------------------------------------------
def _linear_modules(root: torch.nn.Module, keep) -> dict[str, tuple[int, int]]:
    return {
        name: (m.out_features, m.in_features)
        for name, m in root.named_modules()
        if isinstance(m, torch.nn.Linear) and keep(name)
    }


def flux_linear_modules(transformer) -> dict[str, tuple[int, int]]:
    """Linear layers of the FLUX transformer's blocks (what a typical FLUX LoRA touches)."""
    return _linear_modules(transformer, lambda n: n.startswith(("transformer_blocks.", "single_transformer_blocks.")))


def llama_linear_modules(model) -> dict[str, tuple[int, int]]:
    """Attention and MLP projections of a Llama model (PEFT's usual all-linear targets)."""
    return _linear_modules(model, lambda n: n.rsplit(".", 1)[-1] in LLAMA_TARGETS)


def _random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int, scale: float, prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (n, m) in sorted(shapes.items()):
        sd[f"{prefix}{mod}.lora_A.weight"] = torch.randn(rank, m, generator=g) / m**0.5
        sd[f"{prefix}{mod}.lora_B.weight"] = torch.randn(n, rank, generator=g) * scale
    return sd


def random_flux_lora(transformer, rank: int = 4, seed: int = 0, modules=None, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random diffusers-format FLUX LoRA over ``modules`` (default: every block Linear)."""
    shapes = flux_linear_modules(transformer)
    if modules is not None:
        shapes = {k: shapes[k] for k in modules}
    return _random_lora(shapes, rank, seed, scale, FLUX_PREFIX)


def random_llama_lora(model, rank: int = 4, seed: int = 0, modules=None, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random PEFT-format Llama LoRA over ``modules`` (default: every attention/MLP projection)."""
    shapes = llama_linear_modules(model)
    if modules is not None:
        shapes = {k: shapes[k] for k in modules}
    return _random_lora(shapes, rank, seed, scale, PEFT_PREFIX)


def llama_lora_config(rank: int = 4, modules=None):
    """The peft.LoraConfig that ``random_llama_lora`` corresponds to (lora_alpha = rank → scale 1)."""
    from peft import LoraConfig

    targets = list(modules) if modules is not None else list(LLAMA_TARGETS)
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)


def lora_to_taskvector(sd: dict[str, torch.Tensor], name: str, prefix: str):
    """A LoRA state dict (A/B keys under ``prefix``) as a TaskVector with scale 1 (alpha = rank)."""
    from devec_core import LowRank, TaskVector

    mods = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            mod = key[len(prefix) : -len(".lora_A.weight")]
            mods[mod] = LowRank(sd[f"{prefix}{mod}.lora_B.weight"].clone(), sd[key].clone(), 1.0)
    return TaskVector(name, mods)



def llama_vectors(model, seeds=(1, 2, 3), scale: float = 0.3, rank: int = 4) -> list:
    """Random PEFT-format LoRAs on ``model`` as task vectors named "v<seed>" (``random_llama_lora``
    + ``lora_to_taskvector``)."""
    return [lora_to_taskvector(random_llama_lora(model, rank=rank, seed=s, scale=scale), f"v{s}", PEFT_PREFIX) for s in seeds]

# --- LoRA files on disk ----------------------------------------------------------------------
def peft_folder(path, sd: dict[str, torch.Tensor], **cfg):
    """Write a PEFT adapter folder: ``adapter_model.safetensors`` + ``adapter_config.json`` from
    ``LoraConfig(**cfg)`` (target_modules default: LLAMA_TARGETS). Returns the folder."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "adapter_model.safetensors"))
    cfg.setdefault("target_modules", list(LLAMA_TARGETS))
    LoraConfig(**cfg).save_pretrained(str(path))
    return path


def shared_flux_pair(transformer, folder) -> list:
    """Two diffusers FLUX LoRA files (rank 4, seeds 1 and 2) whose first B column is the same in
    every module, so both shared and unique parts are nonzero. Returns their paths."""
    from safetensors.torch import save_file

    a = random_flux_lora(transformer, rank=4, seed=1)
    b = random_flux_lora(transformer, rank=4, seed=2)
    for k in a:
        if k.endswith("lora_B.weight"):
            b[k][:, 0] = a[k][:, 0]
    paths = [folder / "a.safetensors", folder / "b.safetensors"]
    for sd, p in zip((a, b), paths):
        save_file(sd, str(p))
    return paths


def dora_folder(model, folder, targets=("q_proj", "v_proj", "down_proj")):
    """Save a rank-4 DoRA adapter of ``model`` (alpha 8, random factors, magnitudes × 1.1) to
    ``folder``; returns (folder, PEFT's merged weights {name: tensor}). ``model`` is wrapped by PEFT."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.1)
    pm.save_pretrained(str(folder))
    merged = pm.merge_and_unload()
    return folder, {n: p.detach().clone() for n, p in merged.named_parameters()}
