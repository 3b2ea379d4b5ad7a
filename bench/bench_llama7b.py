"""A LLaMA-2-7B-shaped pool of full fine-tunes + a DoRA target: memory and time, against whole dense deltas.

    python bench/bench_llama7b.py                    # 2 layers, 10 fine-tunes + 1 DoRA target, 2 threads
    python bench/bench_llama7b.py --threads 1 --layers 2 --rank 64 --energy 0.9

What it builds (in a temp folder under --workdir, deleted at the end unless --keep):
  * a base checkpoint with LLaMA-2-7B's real widths (hidden 4096, MLP 11008, 32 heads,
    vocab 32000) but ``--layers`` decoder layers, random weights, float16, sharded like the Hub
    (one shard per layer + embeddings + head, ``model.safetensors.index.json``);
  * ``--vectors`` full "fine-tunes" of it: each delta is a rank-32 low-rank change (8 directions
    common to every fine-tune and the target, 24 of its own) plus dense full-rank noise, so the
    delta is full-rank like a real fine-tune's; one of them has a resized vocabulary (32016, as
    CodeLlama), whose embedding and head must be reported and skipped, not fatal;
  * one DoRA-like target: a PEFT DoRA adapter folder (r 256, alpha 512, all 7 linear layers,
    magnitude vectors), as the paper's toxic adapter.

Each configuration runs in its own child process; peak RSS is the child's ``ru_maxrss`` minus
that of a baseline child that only imports the same libraries:
  read     every tensor of every checkpoint read once and dropped (the I/O floor);
  devec    ``load_pool(..., compress=(rank, energy))``: every dense delta is cut to factors as
           it is read (seeded randomized SVD), then ``decompose(mode="isolate", target=dora)``
           on the factors, then the target's unique part; run on 1 and on all layers, so the
           per-layer memory is a measured difference;
  naive    the baseline: whole dense fp32 deltas kept (``compress=None``), decomposed with a
           full SVD per module (``dense_energy``), on layer 0 only with ``--naive-vectors``
           vectors (a fine-tune and the target): it does not fit otherwise.
Extrapolations to 32 layers and 11 vectors are labelled as such. A subspace check compares
the randomized SVD's kept subspace with a full SVD's on a few modules (largest principal angle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, MLP, HEADS, VOCAB = 4096, 11008, 32, 32000
LINEAR: dict[str, tuple[int, int]] = {}


def _set_widths(shrink: int = 1) -> None:
    """LLaMA-2-7B's widths; ``--shrink N`` divides them, for a quick smoke run only (not reported)."""
    global HIDDEN, MLP, VOCAB
    HIDDEN, MLP, VOCAB = 4096 // shrink, 11008 // shrink, 32000 // shrink
    LINEAR.clear()
    LINEAR.update({  # module leaf -> (out, in), LLaMA-2-7B
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN),
        "mlp.down_proj": (HIDDEN, MLP),
    })


_set_widths()
FULL_LAYERS = 32
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


# ---------------------------------------------------------------------------------------------
# 1. Writing the checkpoints
# ---------------------------------------------------------------------------------------------


def _shapes(layers: int, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(layers):
        for leaf, shape in LINEAR.items():
            out[f"model.layers.{i}.{leaf}.weight"] = shape
        out[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (vocab, HIDDEN)
    return out


def _shard_of(key: str) -> str:
    m = LAYER_RE.search(key)
    if m:
        return f"layer{int(m.group(1)):02d}"
    return "embed" if "embed" in key else "head"


def _write_sharded(folder: Path, tensors_fn, keys: list[str]) -> int:
    """Write keys (tensors made on demand, one shard at a time) as HF-style shards + index."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shards: dict[str, list[str]] = {}
    for k in keys:
        shards.setdefault(_shard_of(k), []).append(k)
    names = sorted(shards)
    weight_map, total = {}, 0
    for j, s in enumerate(names):
        fname = f"model-{j + 1:05d}-of-{len(names):05d}.safetensors"
        sd = {k: tensors_fn(k) for k in shards[s]}
        total += sum(t.numel() * t.element_size() for t in sd.values())
        save_file(sd, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
        del sd
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
                                                    "intermediate_size": MLP, "num_attention_heads": HEADS,
                                                    "num_hidden_layers": len([n for n in names if n.startswith("layer")]),
                                                    "vocab_size": VOCAB}))
    return total


def build(dirpath: Path, layers: int, vectors: int, seed: int = 0) -> dict:
    """Base, fine-tunes, DoRA adapter. Returns sizes in bytes."""
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    dirpath.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(layers)
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    for k, shp in shapes.items():
        if len(shp) == 1:
            base[k] = (1.0 + 0.02 * torch.randn(shp, generator=g)).half()
        else:
            base[k] = (0.02 * torch.randn(shp, generator=g)).half()
    sizes = {"base": _write_sharded(dirpath / "base", lambda k: base[k], list(shapes))}
    # common directions per module (shared by every fine-tune and the target)
    common = {k: torch.linalg.qr(torch.randn(shp[0], 8, generator=g))[0] for k, shp in shapes.items() if len(shp) == 2 and "layers" in k}

    def ft_tensor(k: str, i: int, vocab: int) -> torch.Tensor:
        gi = torch.Generator().manual_seed(1000 * (i + 1) + zlib.crc32(k.encode()) % 997)
        w0 = base[k].float()
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            if vocab != VOCAB:  # resized vocabulary: new rows appended
                w0 = torch.cat([w0, 0.02 * torch.randn(vocab - VOCAB, HIDDEN, generator=gi)])
            return (w0 + 2e-4 * torch.randn(w0.shape, generator=gi)).half()
        if w0.ndim == 1:
            return (w0 + 1e-3 * torch.randn(w0.shape, generator=gi)).half()
        n, m = w0.shape
        Bm = torch.cat([2 * common[k], torch.randn(n, 24, generator=gi) / math.sqrt(n)], 1)  # (n, 32): common ones stronger
        Am = torch.randn(32, m, generator=gi)  # (32, m)
        low = (Bm @ Am) * (1e-3 * math.sqrt(n / 32))  # entries ~1e-3
        noise = 2e-4 * torch.randn(n, m, generator=gi)  # full rank, ~4 % of the energy
        return (w0 + low + noise).half()

    for i in range(vectors):
        vocab = VOCAB + 16 if i == vectors - 1 else VOCAB  # the last one: CodeLlama-like vocabulary
        keys = list(_shapes(layers, vocab))
        sizes[f"ft{i}"] = _write_sharded(dirpath / f"ft{i}", lambda k, i=i, vocab=vocab: ft_tensor(k, i, vocab), keys)
    # DoRA-like target: PEFT DoRA adapter, r 256, alpha 512, all linear layers
    r, alpha = 256, 512
    sd = {}
    gd = torch.Generator().manual_seed(seed + 7)
    for k, shp in shapes.items():
        if len(shp) != 2 or "layers" not in k:
            continue
        n, m = shp
        mod = k[: -len(".weight")]
        # B A entries ~1e-3 (the common directions 4x stronger); magnitudes 0.1 % off the merged row norms
        B = torch.cat([4 * common[k], torch.randn(n, r - 8, generator=gd) / math.sqrt(n)], 1) * (1e-3 * math.sqrt(n / r) / 2)
        A = torch.randn(r, m, generator=gd)  # (r, m)
        W = base[k].float() + (alpha / r) * (B @ A)
        mag = W.norm(dim=1) * (1 + 1e-3 * torch.randn(n, generator=gd))
        sd[f"base_model.model.{mod}.lora_A.weight"] = A.half()
        sd[f"base_model.model.{mod}.lora_B.weight"] = B.half()
        sd[f"base_model.model.{mod}.lora_magnitude_vector"] = mag.half()
    (dirpath / "dora").mkdir()
    save_file(sd, str(dirpath / "dora" / "adapter_model.safetensors"))
    (dirpath / "dora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_dora": True, "lora_dropout": 0.02,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "llama-2-7b-shaped (random)"}))
    sizes["dora"] = sum(t.numel() * t.element_size() for t in sd.values())
    sizes["seconds"] = time.perf_counter() - t0
    return sizes


# ---------------------------------------------------------------------------------------------
# 2. Children: one configuration per process
# ---------------------------------------------------------------------------------------------


class _LayerFilter:
    """A base reader exposing only the parameters of the first ``layers`` layers (+ the rest when
    ``others``): the loader iterates the base's keys, so this restricts what is read."""

    def __init__(self, reader, layers: int, others: bool):
        self._r, self.path = reader, reader.path
        self._keys = [k for k in reader.keys() if (int(m.group(1)) < layers if (m := LAYER_RE.search(k)) else others)]

    def keys(self):
        return list(self._keys)

    def __contains__(self, key):
        return key in self._r

    def get(self, key):
        return self._r.get(key)


def _filtered_dora(src: Path, dst: Path, layers: int) -> Path:
    from safetensors.torch import load_file, save_file

    sd = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if int(LAYER_RE.search(k).group(1)) < layers}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst / "adapter_model.safetensors"))
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    return dst


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (the DoRA math imports it; the baseline pays for it too)
    import safetensors  # noqa: F401

    from devec_core.formats import CheckpointReader, load_checkpoint_deltas, load_task_vector
    from devec_core.pool import decompose
    from devec_core.taskvec import LowRank

    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool
    D = Path(args.dir)
    fts = sorted((p for p in D.glob("ft*") if p.is_dir()), key=lambda p: int(p.name[2:]))
    out: dict = {"config": args.child, "rss_start_mb": _rss_mb()}
    if args.child == "baseline":
        pass
    elif args.child == "build":
        out["sizes"] = build(D, args.layers, args.vectors)
    elif args.child == "read":
        t0 = time.perf_counter()
        nbytes = 0
        for folder in [D / "base", *fts]:
            r = CheckpointReader(folder)
            for k in r.keys():
                nbytes += r.get(k).numel() * 2
        from safetensors.torch import load_file

        nbytes += sum(t.numel() * 2 for t in load_file(str(D / "dora" / "adapter_model.safetensors")).values())
        out.update(seconds=time.perf_counter() - t0, bytes=nbytes)
    elif args.child in ("devec", "naive"):
        naive = args.child == "naive"
        layers = args.naive_layers if naive else args.layers_used
        base = _LayerFilter(CheckpointReader(D / "base"), layers, others=not naive)
        srcs = fts[: args.naive_vectors - 1] if naive else fts
        compress = None if naive else (args.rank, args.energy)
        stamps: list[tuple[int, float]] = []
        keys = base.keys()
        t0 = time.perf_counter()
        vecs = load_checkpoint_deltas(srcs, base, [p.name for p in srcs], compress=compress,
                                      progress=lambda d, t, s: stamps.append((d, time.perf_counter())))
        t_ckpt = time.perf_counter() - t0
        per_layer: dict[str, float] = {}
        prev = t0
        for (d, t), k in zip(stamps, keys):
            m = LAYER_RE.search(k)
            tag = f"layer{m.group(1)}" if m else "embed/head/norm"
            per_layer[tag] = per_layer.get(tag, 0.0) + (t - prev)
            prev = t
        dora_dir = D / "dora" if layers >= args.layers else _filtered_dora(D / "dora", Path(args.scratch) / f"dora{layers}", layers)
        t1 = time.perf_counter()
        target = load_task_vector(dora_dir, "dora", base=base, compress=compress)
        t_dora = time.perf_counter() - t1
        pool = vecs + [target]
        held = sum(t.numel() * t.element_size() for v in pool for d in v.modules.values()
                   for t in ((d.B, d.A) if isinstance(d, LowRank) else (d.W,)))
        rss_loaded = _rss_mb()
        t2 = time.perf_counter()
        mode = dict(mode="isolate", target="dora") if len(pool) > 1 else dict(mode="joint")  # one vector: bases and SVDs only
        dec = decompose(pool, tau=0.85, dense_energy=args.energy, **mode)
        dims = dec.shared_dims()
        t_dec = time.perf_counter() - t2
        t3 = time.perf_counter()
        uniq = dec.component("unique", "dora")
        t_uni = time.perf_counter() - t3
        out.update(
            layers=layers, vectors=len(pool), t_ckpt=t_ckpt, t_dora=t_dora, t_decompose=t_dec, t_unique=t_uni,
            per_layer=per_layer, held_bytes=held, rss_loaded_mb=rss_loaded,
            modules=len(dims), shared_dims_mean=sum(dims.values()) / max(len(dims), 1),
            ranks=sorted({d.rank for v in pool for d in v.modules.values() if isinstance(d, LowRank)}),
            unique_lowrank=all(isinstance(d, LowRank) for d in uniq.values()),
            dense_modules=sum(not isinstance(d, LowRank) for v in pool for d in v.modules.values()),
            skipped={v.name: [s["parameter"] for s in v.meta.get("skipped", [])] for v in pool if v.meta.get("skipped")},
        )
    elif args.child == "subspace":
        out["angles"] = subspace_check(D, args)
    out["rss_peak_mb"] = _rss_mb()
    return out


def subspace_check(D: Path, args) -> list[dict]:
    """Largest principal angle between the kept subspace of the randomized cut and of a full SVD."""
    import torch

    from devec_core.formats import CheckpointReader, cut_dense

    base, ft = CheckpointReader(D / "base"), CheckpointReader(D / "ft0")
    rows = []
    for leaf in args.subspace_modules.split(","):
        key = f"model.layers.0.{leaf}.weight"
        W = ft.get(key).float() - base.get(key).float()
        t0 = time.perf_counter()
        lr = cut_dense(W, rank=args.rank, energy=args.energy)
        t_rand = time.perf_counter() - t0
        t0 = time.perf_counter()
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        t_full = time.perf_counter() - t0
        k = lr.rank
        Qr = torch.linalg.qr(lr.B)[0]  # (n, k): span of the randomized cut
        cos = torch.linalg.svdvals(U[:, :k].mT.double() @ Qr.double())
        angle = math.degrees(math.acos(min(1.0, float(cos.min()))))
        e_cut = 1 - float(((W - lr.dense()) ** 2).sum() / (W**2).sum())
        e_full = float((S[:k].double() ** 2).sum() / (S.double() ** 2).sum())
        rows.append({"module": key, "shape": list(W.shape), "k": k, "max_angle_deg": angle, "energy_cut": e_cut,
                     "energy_full_svd_k": e_full, "s_rand": t_rand, "s_full": t_full})
    return rows


def run_child(name: str, args, **over) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--dir", str(args.dir), "--threads", str(args.threads),
           "--rank", str(args.rank), "--energy", str(args.energy), "--layers", str(args.layers), "--vectors", str(args.vectors),
           "--naive-vectors", str(args.naive_vectors), "--naive-layers", str(args.naive_layers), "--scratch", str(args.scratch),
           "--shrink", str(args.shrink), "--subspace-modules", args.subspace_modules]
    for k, v in over.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"child {name} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    print(f"  [{name}{' ' + str(over) if over else ''}] done in {res['wall']:.0f} s, peak RSS {res['rss_peak_mb']:.0f} MiB", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# 3. The table
# ---------------------------------------------------------------------------------------------


def report(args, sizes, base, read, dv1, dv, nv, sub) -> None:
    gib = lambda mb: mb / 1024  # noqa: E731
    b = base["rss_peak_mb"]
    L = args.layers
    k_all = args.vectors + 1
    print()
    if args.shrink != 1:
        print(f"SMOKE RUN: widths divided by {args.shrink}; these are not LLaMA-2-7B numbers")
    print(f"LLaMA-2-7B widths (hidden {HIDDEN}, MLP {MLP}, {HEADS} heads, vocab {VOCAB}), {L} of {FULL_LAYERS} layers, "
          f"{args.vectors} fine-tunes + 1 DoRA target (r 256); cut rank ≤ {args.rank}, energy {args.energy}; "
          f"{args.threads} thread(s); torch {__import__('torch').__version__}")
    written = f"written in {sizes['seconds']:.0f} s" if sizes["seconds"] == sizes["seconds"] else "written by an earlier run"
    print(f"checkpoints on disk: base {sizes['base'] / 2**30:.2f} GiB, each fine-tune ~{sizes['ft0'] / 2**30:.2f} GiB, "
          f"DoRA adapter {sizes['dora'] / 2**20:.0f} MiB; {written}; baseline process RSS {b:.0f} MiB")
    print()
    # per-layer time of the devec path (all layers run)
    lay = [v for k, v in dv["per_layer"].items() if k.startswith("layer")]
    t_layer_ckpt = sum(lay) / len(lay)
    t_other = dv["per_layer"].get("embed/head/norm", 0.0)
    t_layer_dora = dv["t_dora"] / L
    t_layer_dec = (dv["t_decompose"] + dv["t_unique"]) / L
    t_layer = t_layer_ckpt + t_layer_dora + t_layer_dec
    read_layer = read["seconds"] * (1 - 2 * VOCAB * HIDDEN / _params(L)) / L
    # memory: per-layer increment measured between the 1-layer and the all-layer run
    inc = (dv["rss_peak_mb"] - dv1["rss_peak_mb"]) / max(L - 1, 1)
    peak = dv["rss_peak_mb"] - b
    held_layer = (dv["held_bytes"] - dv1["held_bytes"]) / max(L - 1, 1) / 2**20
    # the peak is the one-module transient (the embedding's deltas) + the factors held so far; the
    # RSS difference between the runs is within allocator noise, so the held factors (counted
    # exactly) give the slope when they are larger
    peak32 = peak + max(inc, held_layer) * (FULL_LAYERS - L)
    # naive (measured on naive_layers layers × naive_vectors vectors)
    nk, nl = args.naive_vectors, args.naive_layers
    n_peak = nv["rss_peak_mb"] - b
    n_held = nv["held_bytes"] / 2**20
    n_time = nv["t_ckpt"] + nv["t_dora"] + nv["t_decompose"] + nv["t_unique"]
    n_layer_vec = n_time / (nl * nk)
    dense_layer_vec = _params(1, embed=False) * 4 / 2**20  # one layer's dense fp32 deltas, one vector (MiB)
    n_held32 = (_params(FULL_LAYERS) * 4 / 2**20) * k_all
    rows = [
        ("measure", "DeVec (factors cut as read)", f"naive: whole dense deltas (baseline)"),
        ("measured on", f"{L} layers × {k_all} vectors (+ 1-layer run)", f"{nl} layer × {nk} vector(s): the DoRA target" + (f" + {nk - 1} fine-tune(s)" if nk > 1 else "")),
        ("peak RSS above baseline, measured", f"{gib(peak):.2f} GiB ({L} layers; 1 layer: {gib(dv1['rss_peak_mb'] - b):.2f} GiB)", f"{gib(n_peak):.2f} GiB"),
        ("held per layer per vector (pool tensors)", f"{held_layer / k_all:.1f} MiB (factors)", f"{dense_layer_vec:.0f} MiB (dense fp32)"),
        ("peak RSS, 32 layers × 11 vectors (EXTRAPOLATED)",
         f"{gib(peak32):.1f} GiB (+{max(inc, held_layer):.0f} MiB per layer; RSS slope measured {inc:+.0f} MiB)",
         f"≥ {gib(n_held32):.0f} GiB (the dense deltas alone)"),
        ("time per layer, all vectors: read + delta + cut", f"{t_layer_ckpt:.1f} s (10 fine-tunes)", "—"),
        ("time per layer: DoRA target (delta + cut)", f"{t_layer_dora:.1f} s", "—"),
        ("time per layer: decompose + unique part", f"{t_layer_dec:.2f} s (11 vectors)", f"{nv['t_decompose'] / nl:.1f} s for {nk} vector(s) (full SVDs)"),
        ("time per layer per vector", f"{t_layer / k_all:.2f} s", f"{n_layer_vec:.1f} s"),
        ("time, 32 layers × 11 vectors (EXTRAPOLATED)", f"{(t_layer * FULL_LAYERS + t_other) / 60:.1f} min "
         f"(embeddings/head/norms {t_other:.0f} s once)", f"{n_layer_vec * k_all * FULL_LAYERS / 3600:.1f} h (linear in modules; embeddings not counted)"),
        ("floor: read every checkpoint once (page cache)", f"{read_layer:.1f} s per layer (11 checkpoints)", ""),
        ("shared dims per module (isolate, τ 0.85; 8 planted)", f"{dv['shared_dims_mean']:.2f}", f"{nv['shared_dims_mean']:.2f}"),
        ("parts the mixes use", "LowRank only" if dv["unique_lowrank"] and not dv["dense_modules"] else "DENSE present",
         f"{nv['dense_modules']} dense modules"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for r in rows:
        print(f"| {r[0]:<{w0}} | {r[1]:<{w1}} | {r[2]} |")
    print()
    print(f"skipped (shape differs from the base): {dv['skipped']}")
    print(f"ranks kept by the cut: {dv['ranks'][:8]}{' ...' if len(dv['ranks']) > 8 else ''}")
    print()
    print("randomized cut vs full SVD (ft0, layer 0):")
    for r in sub["angles"]:
        print(f"  {r['module']:<40} {tuple(r['shape'])} k={r['k']:>3}: largest principal angle {r['max_angle_deg']:.3f}°, "
              f"energy kept {r['energy_cut']:.4f} (full SVD, same k: {r['energy_full_svd_k']:.4f}); "
              f"{r['s_rand']:.2f} s vs full SVD {r['s_full']:.1f} s")


def _sizes(d: Path) -> dict:
    def du(p):
        return sum(f.stat().st_size for f in p.rglob("*.safetensors"))
    return {"base": du(d / "base"), "ft0": du(d / "ft0"), "dora": du(d / "dora"), "seconds": float("nan")}


def _params(layers: int, embed: bool = True) -> int:
    per = sum(n * m for n, m in LINEAR.values()) + 2 * HIDDEN
    return per * layers + (2 * VOCAB * HIDDEN + HIDDEN if embed else 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vectors", type=int, default=10, help="full fine-tunes (plus one DoRA target)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64, help="the cut's rank cap (dense_rank)")
    ap.add_argument("--energy", type=float, default=0.9, help="the cut's energy (dense_energy)")
    ap.add_argument("--naive-vectors", type=int, default=1, help="vectors in the naive run: the DoRA target (+ fine-tunes)")
    ap.add_argument("--subspace-modules", default="self_attn.q_proj,mlp.gate_proj",
                    help="layer-0 modules of ft0 whose randomized cut is compared with a full SVD")
    ap.add_argument("--naive-layers", type=int, default=1)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--reuse", help="use checkpoints written by an earlier --keep run (folder with base/, ft*/, dora/)")
    ap.add_argument("--shrink", type=int, default=1, help="divide every width by N (smoke test only; not LLaMA-2-7B)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--layers-used", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    _set_widths(args.shrink)
    if args.child:
        args.layers_used = args.layers_used or args.layers
        print(json.dumps(child(args)))
        return
    # The parent stays small (stdlib only): a child's ru_maxrss includes what it shared with the
    # parent between fork and exec, so the checkpoints are written in a child too.
    D = Path(tempfile.mkdtemp(prefix="devec_llama7b_", dir=args.workdir))
    args.dir, args.scratch = (Path(args.reuse) if args.reuse else D / "ckpt"), D / "scratch"
    args.scratch.mkdir()
    try:
        if args.reuse:
            print(f"reusing checkpoints in {args.dir}", flush=True)
            sizes = json.loads((args.dir / "sizes.json").read_text()) if (args.dir / "sizes.json").exists() else _sizes(args.dir)
        else:
            print(f"writing checkpoints to {args.dir} ...", flush=True)
            sizes = run_child("build", args)["sizes"]
            (args.dir / "sizes.json").write_text(json.dumps(sizes))
        base = run_child("baseline", args)
        sub = run_child("subspace", args)
        read = run_child("read", args)
        dv1 = run_child("devec", args, layers_used=1)
        dv = run_child("devec", args)
        nv = run_child("naive", args)
        report(args, sizes, base, read, dv1, dv, nv, sub)
    finally:
        if args.keep:
            print(f"kept {args.dir}")
        else:
            shutil.rmtree(D, ignore_errors=True)
            if args.reuse:
                shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
