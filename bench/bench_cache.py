"""Benchmark the decomposition cache: a second ``decompose`` at another τ, against recomputing.

    python bench/bench_cache.py                       # 4 rank-16 LoRAs, FLUX.1 real shapes, all blocks
    python bench/bench_cache.py --blocks 4 --loras 3  # a quicker subset (4 double + 8 single blocks)
    python bench/bench_cache.py --rounds 3 --threads 2

Inputs: diffusers-format FLUX LoRAs with FLUX.1's real module shapes (taken from the real
transformer built on the ``meta`` device, no weights), random values, written to a temp folder.
What the CLI does on each path (``devec_core.cli.run_decompose`` minus the export):
  cold        hash files → miss → load + decompose (τ=0.85) → store entry
  warm (hit)  hash files (memoised) → load the files without the content checks (the entry vouches
              for these bytes) → read entry → Decomposition at τ=0.5 (no SVD, no eigen-solve)
  baseline    no cache: load + decompose at τ=0.5 (what every run costs without the cache)
  alt design  "store the normalised inputs, recompute": read the pool from one safetensors of
              normalised factors + decompose (the other candidate for what an entry holds)
Integrity check on a hit: the SHA-256 per tensor (name, dtype, shape, bytes; cache format 3) timed
on the entry's tensors against the byte sum it replaced (format 2, copied here as the baseline).
Also: the first touch of the parts (``component("unique")`` for every vector) on both paths,
entry size vs input size. Medians over rounds; numbers for the README, no assertions.

    python bench/bench_cache.py --stream-memory       # the full-checkpoint reader's peak memory
    python bench/bench_cache.py --baseline-ref main   # hit: the cache at git REF vs this tree, same run

With ``--baseline-ref REF`` only the hit is timed: ``devec_core`` at commit REF is extracted to a
temp folder and imported beside this tree's; each stores its own entry for the same files, then
rounds alternate (REF's hit, this tree's hit, no cache: load + decompose), so a busy machine slows
all three alike and their ratios stay meaningful.

The I/O bench's second section: peak RSS of reading a base + 2 fine-tuned synthetic checkpoints
(24 × 2048² float32 each, 384 MiB per checkpoint), each variant in a fresh process: streamed
deltas dropped at once (the reader alone), streamed with ``compress`` (pool holds factors),
streamed keeping dense deltas (what ``load_pool`` does by default), against loading whole files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from devec_core import LowRank, TaskVector, decompose  # noqa: E402
from devec_core.algorithm import PAPER_TAU  # noqa: E402
from devec_core.cache import DecompositionCache  # noqa: E402
from devec_core.hashing import digest_tensors  # noqa: E402
from devec_core.formats import load_pool  # noqa: E402
from devec_core.pool import Config  # noqa: E402
from baseline import load_baseline  # noqa: E402  (bench/baseline.py; bench/ is on sys.path when run as a script)


def flux_shapes(blocks: int | None) -> dict[str, tuple[int, int]]:
    """Block Linear shapes of the real FLUX.1 transformer (meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        tr = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                    guidance_embeds=False, axes_dims_rope=[16, 56, 56])
    out = {}
    for n, m in tr.named_modules():
        if not isinstance(m, torch.nn.Linear) or not n.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        idx = int(n.split(".")[1])
        if blocks is not None and idx >= (blocks if n.startswith("transformer_blocks.") else 2 * blocks):
            continue
        out[n] = (m.out_features, m.in_features)
    return out


def write_loras(folder: Path, shapes: dict, k: int, rank: int) -> list[Path]:
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        shared = {}
        sd = {}
        for mod, (n, m) in shapes.items():
            if mod not in shared:
                shared[mod] = torch.randn(n, 2, generator=torch.Generator().manual_seed(hash(mod) % 2**31)) * 0.01
            B = torch.randn(n, rank, generator=g) * 0.01
            B[:, :2] = shared[mod]  # two planted shared directions per module
            sd[f"transformer.{mod}.lora_A.weight"] = torch.randn(rank, m, generator=g) / m**0.5
            sd[f"transformer.{mod}.lora_B.weight"] = B
        p = folder / f"style{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return paths


def old_byte_sum(T: dict) -> dict:
    """The format-2 check (baseline): per tensor, the sum of its bytes as int32 words."""
    out = {}
    for name, t in T.items():
        v = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if v.numel() % 4 == 0:
            v = v.view(torch.int32)
        out[name] = int(v.sum(dtype=torch.int64)) if v.numel() else 0
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def touch_parts(dec) -> None:
    for n in dec.names:
        dec.component("unique", n)


_STREAM_VARIANTS = {
    "stream, drop each delta": "from devec_core.formats import CheckpointReader, iter_checkpoint_deltas\n"
    "for _ in iter_checkpoint_deltas([CheckpointReader(Path(D,'ft1.safetensors')), CheckpointReader(Path(D,'ft2.safetensors'))],"
    " CheckpointReader(Path(D,'base.safetensors'))): pass",
    "stream + compress (rank 8)": "from devec_core.formats import load_pool\n"
    "load_pool([Path(D,'ft1.safetensors'), Path(D,'ft2.safetensors')], base=Path(D,'base.safetensors'), compress=(8, None))",
    "stream, keep dense deltas": "from devec_core.formats import load_pool\n"
    "load_pool([Path(D,'ft1.safetensors'), Path(D,'ft2.safetensors')], base=Path(D,'base.safetensors'))",
    "baseline: whole files": "from safetensors.torch import load_file\n"
    "b = load_file(str(Path(D,'base.safetensors')))\n"
    "ds = [{k: v - b[k] for k, v in load_file(str(Path(D, f))).items()} for f in ('ft1.safetensors', 'ft2.safetensors')]",
}


def stream_memory() -> None:
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.proj.weight": torch.randn(2048, 2048, generator=g) for i in range(24)}
    save_file(base, str(tmp / "base.safetensors"))
    for j in (1, 2):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp / f"ft{j}.safetensors"))
    del base
    root = str(Path(__file__).resolve().parent.parent)
    print("| variant (3 × 384 MiB checkpoints, 16 MiB per parameter) | peak RSS − RSS after imports, MiB |")
    print("|---|---:|")
    for label, code in _STREAM_VARIANTS.items():
        prog = (f"import sys, resource; sys.path.insert(0, {root!r}); from pathlib import Path; import torch; D = {str(tmp)!r}\n"
                "import devec_core.formats, devec_core.export\n"
                "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n" + code + "\n"
                "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024)")
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout.split()[-1]
        print(f"| {label} | {float(out):.0f} |")


def compare_hit(args, tmp: Path, paths: list[Path], names: list[str], in_mb: float) -> None:
    """Hit at τ=0.5: the cache at ``args.baseline_ref`` vs this tree's, alternating rounds."""
    import inspect
    import shutil

    old = load_baseline(args.baseline_ref)
    oc_mod, of_mod, op_mod = (importlib_module(f"devec_baseline.{m}") for m in ("cache", "formats", "pool"))
    opts = {"base": None, "allow_pickle": False}
    sides = {}
    for label, C, lp, cfg, dec_fn in ((f"cache at {args.baseline_ref}", oc_mod.DecompositionCache, of_mod.load_pool, op_mod.Config(),
                                       old.decompose),
                                      ("this tree", DecompositionCache, load_pool, Config(), decompose)):
        cache = C(tmp / f"cmp-{len(sides)}")
        key = cache.key_for_sources(paths, names, cfg, opts)
        cache.put(key, dec_fn(lp(paths, names), tau=PAPER_TAU))
        size = sum(f.stat().st_size for f in cache.path(key).rglob("*") if f.is_file()) / 2**20
        sides[label] = (cache, cfg, size)
    times = {k: [] for k in list(sides) + ["no cache: load + decompose (this tree)"]}
    for _ in range(args.rounds):
        for label, (cache, cfg, _) in sides.items():
            t = time.perf_counter()
            key = cache.key_for_sources(paths, names, cfg, opts)
            if hasattr(cache, "has"):  # the CLI's hit: an entry vouches for the files' contents
                hit = cache.get(key, 0.5, load_pool(paths, names, check_contents=not cache.has(key)))
            elif "vectors" in inspect.signature(cache.get).parameters:  # entries without the inputs' factors
                hit = cache.get(key, 0.5, of_mod.load_pool(paths, names))
            else:
                hit = cache.get(key, 0.5)
            times[label].append(time.perf_counter() - t)
            assert hit is not None
            del hit
        times["no cache: load + decompose (this tree)"].append(timed(lambda: decompose(load_pool(paths, names), tau=0.5))[0])
    # the integrity check alone, on the largest entry's tensors: SHA-256 (this tree) vs the byte sum (format 2)
    big = max(sides.values(), key=lambda sd: sd[2])[0]
    (entry,) = [e for e, _, _ in big.entries()]
    T = load_file(str(entry / "tensors.safetensors"))
    checks = {"SHA-256 per tensor (this tree)": [], "byte sum per tensor (format 2)": []}
    for _ in range(args.rounds):
        checks["SHA-256 per tensor (this tree)"].append(timed(lambda: digest_tensors(T))[0])
        checks["byte sum per tensor (format 2)"].append(timed(lambda: old_byte_sum(T))[0])
    mib = sum(t.numel() * t.element_size() for t in T.values()) / 2**20
    del T
    base = statistics.median(times["no cache: load + decompose (this tree)"])
    print(f"\n## Hit at another τ (hash files, read + check the entry, re-threshold): {args.rounds} alternating rounds")
    print("| path | median s | all rounds (s) | vs no cache | entry MiB (entry / input) |")
    print("|---|---:|---|---:|---:|")
    for k, v in times.items():
        size = f"{sides[k][2]:.0f} ({sides[k][2] / in_mb:.2f})" if k in sides else ""
        print(f"| {k} | {statistics.median(v):.3f} | {', '.join(f'{t:.3f}' for t in v)} | "
              f"{base / statistics.median(v):.1f}× | {size} |")
    print(f"\n| integrity check of a {mib:.0f} MiB entry (the largest here) | median s |")
    print("|---|---:|")
    for k, v in checks.items():
        print(f"| {k} | {statistics.median(v):.3f} |")
    shutil.rmtree(tmp, ignore_errors=True)


def importlib_module(name: str):
    import importlib

    return importlib.import_module(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=None, help="double blocks kept (single: 2×); default all 19 + 38")
    ap.add_argument("--loras", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stream-memory", action="store_true", help="only the checkpoint reader's memory section")
    ap.add_argument("--baseline-ref", default=None, help="only the hit: the cache at this git commit vs this tree")
    args = ap.parse_args()
    if args.stream_memory:
        return stream_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    shapes = flux_shapes(args.blocks)
    paths = write_loras(tmp, shapes, args.loras, args.rank)
    names = [p.stem for p in paths]
    in_mb = sum(p.stat().st_size for p in paths) / 2**20
    cfg = Config()
    print(f"# {args.loras} rank-{args.rank} FLUX LoRAs, {len(shapes)} modules at real shapes, {in_mb:.0f} MiB of inputs, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    if args.baseline_ref:
        return compare_hit(args, tmp, paths, names, in_mb)

    # the alternative design's entry: the normalised pool in one safetensors
    vecs = load_pool(paths, names)
    alt = tmp / "alt.safetensors"
    save_file({f"{v.name}|{m}|{p}": (d.B * d.scale if p == "B" else d.A).contiguous()
               for v in vecs for m, d in v.modules.items() for p in ("B", "A")}, str(alt))
    del vecs

    def load_alt():
        T = load_file(str(alt))
        out = {n: {} for n in names}
        for key, t in T.items():
            n, m, p = key.split("|")
            out[n].setdefault(m, {})[p] = t
        return [TaskVector(n, {m: LowRank(d["B"], d["A"]) for m, d in out[n].items()}) for n in names]

    rows = {k: [] for k in ("cold", "cold: hash", "cold: load", "cold: decompose", "cold: store", "warm (hit)", "warm: hash",
                            "warm: load", "warm: read", "warm: SHA-256 check", "warm: old byte sum", "baseline",
                            "baseline: load", "baseline: decompose", "alt design", "parts after hit", "parts after recompute")}
    entry_mb = 0.0
    for r in range(args.rounds):
        cache = DecompositionCache(tmp / f"cache{r}")
        t_hash, key = timed(lambda: cache.key_for_sources(paths, names, cfg, {"base": None, "allow_pickle": False}))
        t_load, vecs = timed(lambda: load_pool(paths, names))
        t_dec, dec = timed(lambda: decompose(vecs, tau=PAPER_TAU))
        t_put, _ = timed(lambda: cache.put(key, dec))
        rows["cold"].append(t_hash + t_load + t_dec + t_put)
        for k, v in (("cold: hash", t_hash), ("cold: load", t_load), ("cold: decompose", t_dec), ("cold: store", t_put)):
            rows[k].append(v)
        entry_mb = cache.entries()[0][1] / 2**20
        del dec, vecs

        t_h2, key2 = timed(lambda: cache.key_for_sources(paths, names, cfg, {"base": None, "allow_pickle": False}))
        # the CLI's hit: an entry for these files' SHA-256 vouches for their contents (no re-checks)
        t_l2, vecs2 = timed(lambda: load_pool(paths, names, check_contents=not cache.has(key2)))
        t_get, hit = timed(lambda: cache.get(key2, 0.5, vecs2))
        assert hit is not None
        rows["warm (hit)"].append(t_h2 + t_l2 + t_get)
        rows["warm: hash"].append(t_h2)
        rows["warm: load"].append(t_l2)
        rows["warm: read"].append(t_get)
        rows["parts after hit"].append(timed(lambda: touch_parts(hit))[0])
        del hit
        (entry,) = [e for e, _, _ in cache.entries()]
        T = load_file(str(entry / "tensors.safetensors"))
        rows["warm: SHA-256 check"].append(timed(lambda: digest_tensors(T))[0])
        rows["warm: old byte sum"].append(timed(lambda: old_byte_sum(T))[0])
        del T

        t_l, vecs = timed(lambda: load_pool(paths, names))
        t_d, dec = timed(lambda: decompose(vecs, tau=0.5))
        rows["baseline"].append(t_l + t_d)
        rows["baseline: load"].append(t_l)
        rows["baseline: decompose"].append(t_d)
        rows["parts after recompute"].append(timed(lambda: touch_parts(dec))[0])
        del dec, vecs

        rows["alt design"].append(timed(lambda: decompose(load_alt(), tau=0.5))[0])

    base = statistics.median(rows["baseline"])
    print("\n| path (second run at another τ unless cold) | median s | vs baseline |")
    print("|---|---:|---:|")
    for k, v in rows.items():
        med = statistics.median(v)
        print(f"| {k} | {med:.3f} | {base / med:.1f}× |" if not k.startswith(("cold:", "warm:", "baseline:")) else f"| {k} | {med:.3f} | |")
    print(f"\ncache entry {entry_mb:.0f} MiB for {in_mb:.0f} MiB of inputs (entry / input {entry_mb / in_mb:.2f})")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
