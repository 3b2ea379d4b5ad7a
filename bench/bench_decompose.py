"""Benchmark: DeVec's low-rank fast path against the literal method (n×n projections + eig).

Prints two tables:
  1. per FLUX-shaped module, rank 16, k = 2, 3, 4: fast path vs the literal equations
     (tests/literal.py). The literal method is measured at n = 3072 and extrapolated by n³
     (its eigen-decomposition of the n×n product dominates) for the taller modules — labelled.
  2. the whole FLUX.1 transformer pool (the 494 Linear modules a full LoRA targets, real shapes
     from the diffusers config on the meta device) with 4 random rank-16 LoRAs: end-to-end
     decomposition, a τ change, peak memory, and the literal method extrapolated per module.

    python bench/bench_decompose.py            # full run (~2-4 min on 2 CPU cores)
    python bench/bench_decompose.py --quick    # smaller literal reference, fewer repeats
    python bench/bench_decompose.py --pool-only --baseline-ref 89f9148   # + old engine, same run
    python bench/bench_decompose.py --pool-only --profile --threads 2    # where one decompose's time goes
    python bench/bench_decompose.py --pool-only --timeline --threads 2   # when each worker ran its pieces
    python bench/bench_decompose.py --pool-only --pieces-sweep 3,4,8,32 --threads 2 --rounds 10

With ``--baseline-ref REF`` the engine (``devec_core/``) at git commit REF is extracted into a temp
folder and imported beside the working tree's; the whole-pool timings of both are taken in the
same process, alternating (old, new, old, new, ...), so a busy machine slows both alike and the
ratio stays meaningful. The equality of their results is checked (shared dims, unique parts).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devec_core import LowRank, TaskVector, blocks, decompose  # noqa: E402
from devec_core.algorithm import PAPER_TAU  # noqa: E402
from baseline import load_baseline  # noqa: E402  (bench/baseline.py; bench/ is on sys.path when run as a script)
from tests import literal as L  # noqa: E402

FLUX_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (3072, 15360), (9216, 3072)]
FLUX_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=False, axes_dims_rope=[16, 56, 56],
)


def flux_lora_modules() -> list[tuple[str, int, int]]:
    """(name, out, in) of the Linear modules in FLUX.1's 19 double + 38 single blocks."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        t = FluxTransformer2DModel(**FLUX_CONFIG)
    return [
        (n, m.out_features, m.in_features)
        for n, m in t.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]


def random_pool(modules, k: int, rank: int = 16, shared: int = 4, seed: int = 0) -> list[TaskVector]:
    """k random LoRAs; each module's k LoRAs share `shared` tilted column directions."""
    g = torch.Generator().manual_seed(seed)
    vecs = [dict() for _ in range(k)]
    for name, n, m in modules:
        D = torch.randn(n, shared, generator=g) / n**0.5
        for i in range(k):
            B = torch.randn(n, rank, generator=g) / n**0.5
            B[:, :shared] = D + 0.05 * torch.randn(n, shared, generator=g) / n**0.5
            vecs[i][name] = LowRank(B, torch.randn(rank, m, generator=g) / m**0.5, scale=1.0)
    return [TaskVector(f"lora{i}", v) for i, v in enumerate(vecs)]


def timed(fn, repeat: int, warmup: bool = True) -> float:
    """Median seconds of `repeat` calls (after one warm-up unless told otherwise)."""
    if warmup:
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fast_module(pool):
    dec = decompose(pool, tau=PAPER_TAU)
    for v in pool:
        dec.component("unique", v.name)
    return dec


def literal_module(pool):
    Ws = [v.modules["m"].dense(torch.float32) for v in pool]
    Z, _ = L.shared_basis(Ws, PAPER_TAU, tol=64 * 1.2e-7)
    return L.parts(Ws, Z)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="literal reference at n=1536 (extrapolated), 2 repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--pool-only", action="store_true", help="skip the per-module table (the literal method takes minutes)")
    ap.add_argument("--baseline-ref", default=None, help="git commit whose engine is timed beside this one (same run)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds for --baseline-ref")
    ap.add_argument("--compare-only", action="store_true", help="with --baseline-ref: only the same-run comparison")
    ap.add_argument("--chunk-threads", default=None,
                    help="this tree's worker threads (blocks.CHUNK_THREADS): a number or 'auto'; default: the env's")
    ap.add_argument("--gram-variants", action="store_true",
                    help="with --compare-only: also time the Grams as one wide GEMM per module (the idea tried for the floor)")
    ap.add_argument("--profile", action="store_true", help="only: CPU time per stage of one warm decompose (serial)")
    ap.add_argument("--pieces-sweep", default=None, metavar="N,N,...",
                    help="only: warm decomposes alternating blocks.PIECES_PER_WORKER over these values (same process)")
    ap.add_argument("--timeline", action="store_true",
                    help="only: when each worker ran its pieces in warm decomposes (serial parts, idle workers at the end)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunk_threads is not None:
        blocks.CHUNK_THREADS = None if args.chunk_threads == "auto" else max(1, int(args.chunk_threads))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    lit_n = 1536 if args.quick else 3072
    repeat = 2 if args.quick else 5
    print(f"torch {torch.__version__}, device {args.device}, {threads} threads, float32")

    # 1. Per-module table --------------------------------------------------------------------
    print(f"\n## Per module (rank 16): fast path vs literal (literal measured at n = {lit_n}, then ×(n/{lit_n})³)")
    print("| shape (out×in) | k | fast (ms) | literal (s) | literal is | speed-up |")
    print("|---|---|---|---|---|---|")
    lit_at = {}
    for k in (2, 3, 4) if not args.pool_only else ():
        ref = random_pool([("m", lit_n, lit_n)], k, seed=k)
        lit_at[k] = timed(lambda: literal_module(ref), 1, warmup=False)  # minutes per call: no warm-up
    for n, m in FLUX_SHAPES if not args.pool_only else ():
        for k in (2, 3, 4):
            pool = random_pool([("m", n, m)], k, seed=k)
            fast = timed(lambda: fast_module(pool), repeat)
            lit = lit_at[k] * (n / lit_n) ** 3
            kind = "measured" if (n == lit_n and m == lit_n) else "extrapolated"
            print(f"| {n}×{m} | {k} | {fast * 1e3:.1f} | {lit:.1f} | {kind} | {lit / fast:,.0f}× |")

    # 2. Whole FLUX pool ---------------------------------------------------------------------
    mods = flux_lora_modules()
    pool = random_pool(mods, 4)
    if args.profile:
        return profile_stages(pool)
    if args.timeline:
        return timeline(pool, args.rounds)
    if args.pieces_sweep:
        return pieces_sweep(pool, [int(x) for x in args.pieces_sweep.split(",")], args.rounds)
    if args.compare_only and args.baseline_ref:
        return compare_with_baseline(args, pool)
    factor_gib = sum(t.numel() * 4 for v in pool for d in v.modules.values() for t in (d.B, d.A)) / 2**30
    rss0 = rss_gib()
    t0 = time.perf_counter()
    dec = decompose(pool, tau=PAPER_TAU, device=args.device)
    first = time.perf_counter() - t0
    e2e = timed(lambda: decompose(pool, tau=PAPER_TAU, device=args.device), 2 if args.quick else 3)
    taus = iter([0.7, 0.8, 0.9, 0.95, 0.75, 0.85] * 10)
    retau = timed(lambda: dec.with_tau(next(taus)).shared_dims(), 10)
    summ = timed(lambda: dec.with_tau(next(taus)).summary(), 3)
    parts = timed(lambda: [dec.component("unique", v.name) for v in pool], 1)
    lit_pool = sum(lit_at[4] * (n / lit_n) ** 3 for _, n, _ in mods) if lit_at else float("nan")
    dims = dec.shared_dims()
    print(f"\n## Whole FLUX.1 pool: {len(mods)} Linear modules, 4 random rank-16 LoRAs "
          f"({factor_gib:.2f} GiB of fp32 factors in memory), {len(dec.blocks)} stacked blocks")
    print("| measure | value |")
    print("|---|---|")
    print(f"| decompose, end to end (first call) | {first:.2f} s |")
    print(f"| decompose, end to end (median, warm) | {e2e:.2f} s |")
    print(f"| τ change: with_tau(τ).shared_dims() (median of 10) | {retau * 1e3:.1f} ms |")
    print(f"| τ change + full summary (eigenvalues, norms; median) | {summ * 1e3:.0f} ms |")
    print(f"| materialise the 4 unique LoRAs (all modules) | {parts:.2f} s |")
    print(f"| peak RSS of this process (before → after pool) | {rss0:.2f} → {rss_gib():.2f} GiB |")
    print(f"| literal method, extrapolated (Σ per-module, n³) | {lit_pool / 3600:.1f} h |")
    print(f"| speed-up vs literal (extrapolated) | {lit_pool / e2e:,.0f}× |")
    print(f"| floor: ~44 GFLOP ≈ 0.13 s on these cores (issue's figure) | {e2e / 0.13:.1f}× the floor |")
    print(f"| shared dims at τ={PAPER_TAU} (4 planted per module) | mean {statistics.mean(dims.values()):.2f} |")

    if args.baseline_ref:
        compare_with_baseline(args, pool)


STAGES = {  # stage -> functions whose cumulative CPU time it is (one warm decompose, serial)
    "Gram GEMMs (B and A sides, per module; range checks, copies into the results)": ["grams"],
    "norms and bases T (lowrank_bases: Cholesky, eigen route where not certified)": ["bases"],
    "spectra (chain products, 16×16 eig)": ["spectra"],
    "input checks (ranks, work budget, grouping)": ["check_ranks", "check_budget", "group_modules"],
}


def profile_stages(pool):
    """CPU seconds per stage of one warm ``decompose`` (cProfile with a CPU clock; worker threads
    off, since the profiler sees only the calling thread)."""
    import cProfile
    import pstats

    saved, blocks.CHUNK_THREADS = blocks.CHUNK_THREADS, 1
    decompose(pool, tau=PAPER_TAU)
    pr = cProfile.Profile(time.process_time)
    c0 = time.process_time()
    pr.runcall(decompose, pool, tau=PAPER_TAU)
    total = time.process_time() - c0
    blocks.CHUNK_THREADS = saved
    stats = pstats.Stats(pr).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    print(f"\n## Where one warm decompose's CPU time goes (serial, {torch.get_num_threads()} torch threads; "
          "cProfile adds overhead to Python-heavy parts)")
    print("| stage | CPU (s) | share |")
    print("|---|---|---|")
    seen = 0.0
    for stage, names in STAGES.items():
        t = sum(ct for (f, _, fn), (_, _, _, ct, _) in stats.items() if fn in names and "devec_core" in f)
        seen += t
        print(f"| {stage} | {t:.3f} | {t / total:.0%} |")
    print(f"| everything else (Python, stacking, checks of finiteness and range) | {total - seen:.3f} | {(total - seen) / total:.0%} |")
    print(f"| total (under the profiler) | {total:.3f} | 100% |")


def pieces_sweep(pool, values: list[int], rounds: int) -> None:
    """Warm decomposes with each ``blocks.PIECES_PER_WORKER`` in turn, alternating (same process)."""
    saved, times = blocks.PIECES_PER_WORKER, {v: [] for v in values}
    try:
        for v in values:  # warm-up
            blocks.PIECES_PER_WORKER = v
            decompose(pool, tau=PAPER_TAU)
        for _ in range(rounds):
            for v in values:
                blocks.PIECES_PER_WORKER = v
                t0 = time.perf_counter()
                decompose(pool, tau=PAPER_TAU)
                times[v].append(time.perf_counter() - t0)
    finally:
        blocks.PIECES_PER_WORKER = saved
    print(f"\n## Pieces per worker ({rounds} alternating rounds, {torch.get_num_threads()} threads; default {saved})")
    print("| pieces per worker | median wall (s) | mean (s) |")
    print("|---|---|---|")
    for v in values:
        print(f"| {v} | {statistics.median(times[v]):.3f} | {statistics.mean(times[v]):.3f} |")


def timeline(pool, rounds: int) -> None:
    """Per warm decompose: the serial parts before the first piece starts and after the last ends,
    the spread of the workers' end times (one idles while the other finishes), and the pieces."""
    import threading

    events, real = [], blocks._BlockJob.run

    def run(job, sl):
        t0 = time.perf_counter()
        real(job, sl)
        events.append((threading.get_ident(), job.shape, sl.stop - sl.start, t0, time.perf_counter()))

    blocks._BlockJob.run = run
    try:
        decompose(pool, tau=PAPER_TAU)
        rows = []
        for r in range(rounds):
            events.clear()
            t0 = time.perf_counter()
            decompose(pool, tau=PAPER_TAU)
            t1 = time.perf_counter()
            ends = {}
            for th, _, _, _, b in events:
                ends[th] = max(ends.get(th, 0.0), b)
            first, last = min(e[3] for e in events), max(e[4] for e in events)
            rows.append((t1 - t0, first - t0, t1 - last, max(ends.values()) - min(ends.values()), len(events), len(ends)))
            if r == rounds - 1:
                pieces = sorted(events, key=lambda e: e[3])
    finally:
        blocks._BlockJob.run = real
    print(f"\n## Timeline of a warm decompose ({rounds} rounds, {torch.get_num_threads()} threads; medians)")
    print("| measure | ms |")
    print("|---|---|")
    for i, what in enumerate(["total", "serial, before the first piece (checks, grouping, inputs)",
                              "serial, after the last piece (assembly, zero check)",
                              "a worker idle at the end (spread of the workers' last end times)"]):
        print(f"| {what} | {statistics.median(r[i] for r in rows) * 1e3:.1f} |")
    print(f"| pieces / workers | {rows[-1][4]} / {rows[-1][5]} |")
    print("\nLast round's pieces, by start (ms from the call):")
    names = {th: f"w{i}" for i, th in enumerate(dict.fromkeys(e[0] for e in pieces))}
    for th, shape, n, a, b in pieces:
        print(f"  {names[th]} {shape[0]}×{shape[1]} ×{n:3d}: {1e3 * (a - t0):6.1f} → {1e3 * (b - t0):6.1f}")


GRAMS_PER_MODULE = 12


def _chain_need(k: int) -> list[tuple[int, int]]:
    """The Gram pairs a joint spectrum of k members reads: the diagonal and C₁₂, C₂₃, …, C_k1."""
    return [(i, i) for i in range(k)] + [(i, (i + 1) % k) for i in range(k)]


def grams_alone(pool) -> None:
    """The GEMMs no joint decomposition of this pool can skip, and nothing else: per module the 4
    diagonal B-side Grams BᵢᵀBᵢ, the 4 chain crosses BᵢᵀBᵢ₊₁ (C₁₂, C₂₃, C₃₄, C₄₁) and the 4 A-side
    Grams AᵢAᵢᵀ (the rank cut sees the product), spread over the worker threads as the engine does."""
    need = _chain_need(len(pool))

    def run(mods: list[str]):
        for mod in mods:
            B = [v.modules[mod].B for v in pool]
            A = [v.modules[mod].A for v in pool]
            for i, j in need:
                B[i].mT @ B[j]
            for a in A:
                a @ a.mT

    on_workers(run, pool)


def on_workers(run, pool) -> None:
    """``run(module names)`` over all modules the way the engine spreads its work: modules grouped
    by shape, cut into the engine's pieces (``blocks.cut_pieces``, ``blocks.gram_cost``), one queue
    of workers (``blocks.parallel_tasks``)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for mod, d in pool[0].modules.items():
        by_shape.setdefault(tuple(d.shape), []).append(mod)
    k, widths = len(pool), [v.modules[next(iter(by_shape.values()))[0]].rank for v in pool]
    costs = [blocks.gram_cost(shape, widths, _chain_need(k), list(range(k))) for shape in by_shape]
    groups = list(by_shape.values())
    w = blocks.workers(sum(map(len, groups)) // blocks.MIN_PIECE)
    pieces = blocks.cut_pieces([len(g) for g in groups], costs, w)
    blocks.parallel_tasks([lambda bi=bi, sl=sl: run(groups[bi][sl]) for _, bi, sl in pieces], w)


def grams_one_gemm(pool) -> None:
    """The idea tried for the floor: per module the four factors copied side by side, then one Gram
    each side, (n×4r)ᵀ(n×4r) and (4r×m)(4r×m)ᵀ: all 16 blocks, of which 8 (B side) and 4 (A side)
    are needed. Same worker threads as ``grams_alone``."""

    def run(mods: list[str]):
        for mod in mods:
            X = torch.cat([v.modules[mod].B for v in pool], 1)
            Y = torch.cat([v.modules[mod].A for v in pool], 0)
            X.mT @ X
            Y @ Y.mT

    on_workers(run, pool)


def compare_with_baseline(args, pool):
    """Warm whole-pool decomposition, baseline engine vs this one, alternating in one process."""
    old = load_baseline(args.baseline_ref)
    old_pool = [old.TaskVector(v.name, {m: old.LowRank(d.B, d.A, d.scale) for m, d in v.modules.items()}) for v in pool]
    engines = {"baseline": lambda: old.decompose(old_pool, tau=PAPER_TAU, device=args.device),
               "this tree": lambda: decompose(pool, tau=PAPER_TAU, device=args.device),
               "Grams alone": lambda: grams_alone(pool)}
    if args.gram_variants:
        engines["Grams as one wide GEMM per module"] = lambda: grams_one_gemm(pool)
    for fn in engines.values():
        fn()  # warm-up
    times = {k: [] for k in engines}
    cpu = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, fn in engines.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    a, b = engines["baseline"](), engines["this tree"]()
    floors = [k for k in engines if k.startswith("Grams")]
    floor_rows = {k: (times.pop(k), cpu.pop(k)) for k in floors}
    for k in floors:
        engines.pop(k)
    same_dims = a.shared_dims() == b.shared_dims()
    worst = 0.0
    for v in pool[:2]:
        ua, ub = a.component("unique", v.name), b.component("unique", v.name)
        for m in list(ua)[:: max(1, len(ua) // 40)]:  # every ~12th module
            x, y = ua[m].dense(torch.float64), ub[m].dense(torch.float64)
            worst = max(worst, float((x - y).norm() / x.norm()))
    med = {k: statistics.median(t) for k, t in times.items()}
    ratios = [o / n for o, n in zip(times["baseline"], times["this tree"])]
    print(f"\n## Same run: engine at {args.baseline_ref} vs this tree ({args.rounds} alternating rounds, warm; "
          f"CPU = process CPU seconds, less sensitive to a busy machine than wall time)")
    print("| engine | median wall (s) | median CPU (s) | wall, every round (s) |")
    print("|---|---|---|---|")
    for k in engines:
        print(f"| {k} | {med[k]:.3f} | {statistics.median(cpu[k]):.3f} | {', '.join(f'{t:.3f}' for t in times[k])} |")
    cratios = [o / n for o, n in zip(cpu["baseline"], cpu["this tree"])]
    print(f"| speed-up per round (baseline / this) | wall: median {statistics.median(ratios):.2f}× | "
          f"CPU: median {statistics.median(cratios):.2f}× | wall: {', '.join(f'{r:.2f}' for r in ratios)} |")
    for k, (gw, gc) in floor_rows.items():
        what = (f"floor: the Grams alone (the {GRAMS_PER_MODULE} GEMMs per module a joint spectrum of 4 LoRAs needs, same data, "
                "same worker threads)" if k == "Grams alone" else "the same Grams as one wide GEMM per side per module, after a copy")
        print(f"| {what} | {statistics.median(gw):.3f} | {statistics.median(gc):.3f} | {', '.join(f'{t:.3f}' for t in gw)} |")
    print(f"| same shared dims on every module | {same_dims} | |")
    print(f"| unique parts, max relative difference (sampled modules) | {worst:.1e} | |")


if __name__ == "__main__":
    main()
