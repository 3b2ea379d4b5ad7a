"""The engine's fast paths (issue 11 item 8) against definitions, not against the code they replace.

- ``algorithm.lowrank_bases`` (Cholesky where the rank cut is certified to keep everything, the
  eigen route elsewhere): its basis must span the column space of B·A as the literal SVD of the
  dense product gives it (tests/literal.py), with the same numerical rank as the rule in
  docs/METHOD.md "Rank of a LoRA"; adversarial cases sit on both sides of the cut.
- Chain-only Grams: a joint spectrum is computed from the k diagonal Gram blocks and C_12 … C_k1
  only; its eigenvalues must be those of the n×n product P_1 ⋯ P_k built from the literal bases.
- Whole calls on worker threads (``blocks.parallel_chunks``): the caller's thread settings are
  left as they were and the answer does not depend on the split.
"""

import math
import threading

import pytest
import torch

from devec_core import LowRank, TaskVector, blocks, decompose
from devec_core import algorithm as D
from devec_core.algorithm import PAPER_TAU
from tests import literal as L

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def proj(Q):
    return Q @ Q.mT


def lora(n, m, sv_B, sv_A=None, seed=0, dtype=F64):
    """B (n, r) with singular values ``sv_B`` and A (r, m) with ``sv_A`` (default: well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sv_B)
    UB = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]
    VB = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0]
    B = UB @ torch.diag(torch.tensor(sv_B, dtype=F64)) @ VB
    sv_A = sv_A if sv_A is not None else [1.0 + 0.1 * i for i in range(r)]
    UA = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0]
    VA = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    A = UA @ torch.diag(torch.tensor(sv_A, dtype=F64)) @ VA.mT
    return B.to(dtype), A.to(dtype)


def grams(B, A):
    return (B.mT @ B).to(F64), (A @ A.mT).to(F64)


def literal_basis(B, A):
    """Q of the dense product by its own SVD and the documented cut (σ > max(n, m)·eps·σ_max),
    with the cut of ``rank_rtol`` for Gram-based ranks (the rule's √eps floor)."""
    W = (B.to(F64) @ A.to(F64))
    U, sv, _ = torch.linalg.svd(W, full_matrices=False)
    rtol = D.rank_rtol(*W.shape, B.dtype)
    return U[:, : int((sv > rtol * sv[0]).sum())]


def count_eigen_route(monkeypatch):
    calls = []
    real = D.lowrank_basis
    monkeypatch.setattr(D, "lowrank_basis", lambda G_B, G_A, rtol: (calls.append(G_B.shape[0]), real(G_B, G_A, rtol))[1])
    return calls


# --------------------------------------------------------------------------------------------
# lowrank_bases: the span and rank of B·A, certified or not
# --------------------------------------------------------------------------------------------


CASES = {
    # name: (B's singular values, A's singular values, expected rank)
    "well conditioned": ([3.0, 2.0, 1.5, 1.0, 0.7, 0.5], None, 6),
    "B rank deficient": ([3.0, 2.0, 1.5, 1.0, 0.0, 0.0], None, 4),
    "A rank deficient": ([3.0, 2.0, 1.5, 1.0, 0.7, 0.5], [2.0, 1.0, 1.0, 0.5, 0.0, 0.0], 4),
    "weak column of B, strong row of A": ([1.0, 1.0, 1.0, 1.0, 1.0, 1e-3], [1.0, 1.0, 1.0, 1.0, 1.0, 1e3], 6),
    "spread within the cut": ([1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5], None, 6),  # cond 1e10: eigen route
}
TOL = {"spread within the cut": 1e-6}  # the eigen route's own accuracy at cond(BᵀB) = 1e10: ~cond·eps


@pytest.mark.parametrize("case", list(CASES))
def test_fast_bases_span_the_literal_column_space_in_float64(case, monkeypatch):
    sv_B, sv_A, rank = CASES[case]
    B, A = lora(50, 40, sv_B, sv_A, seed=len(case))
    if case == "weak column of B, strong row of A":  # B's column 5 scaled down, A's row 5 up: same product
        B0, A0 = lora(50, 40, [1.0] * 6, seed=1)
        B, A = B0.clone(), A0.clone()
        B[:, 5] *= 1e-3
        A[5] *= 1e3
    want = literal_basis(B, A)
    assert want.shape[1] == rank
    T = D.lowrank_bases(*grams(B, A), D.rank_rtol(50, 40, F64))
    Q = B @ T
    kept = Q[:, T.abs().sum(0) > 0]
    assert kept.shape[1] == rank
    tol = TOL.get(case, 1e-10)
    assert rel(kept.mT @ kept, torch.eye(rank, dtype=F64)) <= tol
    assert rel(proj(kept), proj(want)) <= tol


def test_well_conditioned_bases_skip_the_eigen_route_and_the_others_take_it(monkeypatch):
    calls = count_eigen_route(monkeypatch)
    rtol = D.rank_rtol(50, 40, F64)
    good = [lora(50, 40, CASES["well conditioned"][0], seed=s) for s in range(3)]
    bad = [lora(50, 40, *CASES["B rank deficient"][:2], seed=9), lora(50, 40, *CASES["A rank deficient"][:2], seed=8)]
    order = [good[0], bad[0], good[1], bad[1], good[2]]
    GB = torch.stack([grams(B, A)[0] for B, A in order])
    GA = torch.stack([grams(B, A)[1] for B, A in order])
    T = D.lowrank_bases(GB, GA, rtol)
    assert calls == [2]  # one eigen-route call, for exactly the two deficient modules
    for (B, A), t in zip(order, T):  # each as if alone, and as the literal basis
        Q = (B @ t)[:, t.abs().sum(0) > 0]
        want = literal_basis(B, A)
        assert Q.shape[1] == want.shape[1]
        assert rel(proj(Q), proj(want)) <= 1e-10
    calls.clear()
    D.lowrank_bases(GB[[0, 2, 4]], GA[[0, 2, 4]], rtol)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [0.3, 0.9, 1.1, 3.0, 30.0])
def test_rank_next_to_the_cut_is_the_rule_s_rank(dtype, ratio):
    """A direction of B·A at ``ratio``×(the cut): kept iff above it (the rule), whichever route."""
    n, m = 60, 50
    rtol = D.rank_rtol(n, m, dtype)
    B, A = lora(n, m, [1.0, 0.9, 0.8, 0.7, 0.6, ratio * rtol], [1.0] * 6, seed=int(ratio * 10), dtype=dtype)
    T = D.lowrank_bases(*grams(B, A), rtol)
    T_eig = D.lowrank_basis(*grams(B, A), rtol)[0]
    rank = int((T.abs().sum(0) > 0).sum())
    assert rank == int((T_eig.abs().sum(0) > 0).sum())
    if ratio < 0.5 or ratio > 2:  # clearly on one side (near 1, rounding of the Gram may decide)
        assert rank == (6 if ratio > 1 else 5)
    Q = (B.to(F64) @ T)[:, T.abs().sum(0) > 0]
    Qe = (B.to(F64) @ T_eig)[:, T_eig.abs().sum(0) > 0]
    tol = 1e-10 if dtype == F64 else 1e-4
    assert rel(proj(Q), proj(Qe)) <= tol


def test_float32_fast_bases_are_as_exact_as_the_eigen_route():
    B, A = lora(3072, 1000, [2.0, 1.7, 1.5, 1.3, 1.2, 1.0, 0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1],
                seed=5, dtype=torch.float32)
    rtol = D.rank_rtol(3072, 1000, torch.float32)
    T = D.lowrank_bases(*grams(B, A), rtol)
    T_eig = D.lowrank_basis(*grams(B, A), rtol)[0]
    want = literal_basis(B, A)
    for t in (T, T_eig):
        Q = B.to(F64) @ t
        assert Q.shape[1] == want.shape[1] == 16
        assert rel(Q.mT @ Q, torch.eye(16, dtype=F64)) <= 1e-5
        assert rel(proj(Q), proj(want)) <= 1e-5


def test_zero_and_nonfinite_grams_take_the_eigen_route(monkeypatch):
    calls = count_eigen_route(monkeypatch)
    B, A = lora(30, 20, [1.0, 0.5, 0.3])
    Bz = B.clone()
    Bz[:, 1] = 0
    GB = torch.stack([grams(B, A)[0], grams(Bz, A)[0], torch.zeros(3, 3, dtype=F64)])
    GA = torch.stack([grams(B, A)[1]] * 3)
    T = D.lowrank_bases(GB, GA, D.rank_rtol(30, 20, F64))
    assert calls == [2]
    assert [int((t.abs().sum(0) > 0).sum()) for t in T] == [3, 2, 0]


# --------------------------------------------------------------------------------------------
# Chain-only Grams: the spectrum of P_1 ⋯ P_k from C_12 … C_k1 and the diagonal blocks
# --------------------------------------------------------------------------------------------


def mixed_pool(k=4, seed=0, dtype=F64, copies=1):
    """k LoRAs on modules of three shapes (``copies`` of each); one member rank deficient on the
    "b" modules, one scaled down."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"{x}{c}": nm for x, nm in (("a", (64, 48)), ("b", (96, 32)), ("c", (40, 80))) for c in range(copies)}
    vecs = [dict() for _ in range(k)]
    for mod, (n, m) in shapes.items():
        D0 = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=F64))[0]
        for i in range(k):
            B = torch.randn(n, 8, generator=g, dtype=F64) / n**0.5
            B[:, :3] = D0 + 0.1 * torch.randn(n, 3, generator=g, dtype=F64) / n**0.5
            if i == 1 and mod.startswith("b"):
                B[:, 7] = 0.5 * B[:, 6]  # rank 7, exactly so in float32 too
            A = torch.randn(8, m, generator=g, dtype=F64)
            vecs[i][mod] = LowRank(B.to(dtype), A.to(dtype), scale=0.25 if i == 2 else 1.0)
    return [TaskVector(f"v{i}", v) for i, v in enumerate(vecs)]


def test_joint_spectra_from_chain_grams_equal_the_literal_product():
    pool = mixed_pool()
    dec = decompose(pool, tau=PAPER_TAU, dtype="float64")
    for blk in dec.blocks:
        k = len(blk.members)
        need = {(p, p) for p in range(k)} | {(p, (p + 1) % k) for p in range(k)}
        assert {tuple(sorted(ij)) for ij in blk.grams} == {tuple(sorted(ij)) for ij in need}  # no other block
        sp = blk.spectrum(tuple(range(k)), False)
        for b, mod in enumerate(blk.modules):
            Ws = [pool[i].modules[mod].dense(F64) for i in blk.members]
            P = torch.eye(Ws[0].shape[0], dtype=F64)
            for W in Ws:
                Q = L.basis(W)
                P = P @ Q @ Q.T
            want = torch.linalg.eigvals(P)
            want = want[want.abs() > 1e-9]
            got = sp.eigvals[b][sp.eigvals[b].abs() > 1e-9]
            key = lambda z: (round(float(z.real), 6), round(abs(float(z.imag)), 6))  # noqa: E731
            assert len(got) == len(want)
            for x, y in zip(sorted(got, key=key), sorted(want, key=key)):
                assert abs(complex(x) - complex(y)) <= 1e-10


@pytest.mark.parametrize("mode", ["joint", "pairwise", "isolate"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_pool_parts_equal_the_literal_equations(mode, dtype):
    pool = mixed_pool(seed=3, dtype=F64 if dtype == "float64" else torch.float32)
    dec = decompose(pool, tau=PAPER_TAU, mode=mode, target="v0" if mode == "isolate" else None, dtype=dtype)
    tol = 1e-10 if dtype == "float64" else 1e-4
    for mod in ("a0", "b0", "c0"):
        Ws = [v.modules[mod].dense(F64) for v in pool]
        if mode == "joint":
            Z, vals = L.shared_basis(Ws, PAPER_TAU)
            assert float((vals.real - PAPER_TAU).abs().min()) > 1e-3
            S, U, merged = L.parts(Ws, Z)
            assert rel(dec.component("merged_shared")[mod].dense(F64), merged) <= tol
        else:  # isolate (target v0) and pairwise both remove from v0 the union of its pair subspaces
            pairs = [L.shared_basis([Ws[0], Ws[j]], PAPER_TAU) for j in range(1, 4)]
            assert all(float((vals.real - PAPER_TAU).abs().min()) > 1e-3 for _, vals in pairs)
            Z = L.union([Zj for Zj, _ in pairs], PAPER_TAU)
            U = [Ws[0] - Z @ Z.T @ Ws[0]]
        got = dec.component("unique", "v0")[mod].dense(F64)
        assert rel(got, U[0]) <= tol


# --------------------------------------------------------------------------------------------
# Worker threads: thread settings untouched, same answer
# --------------------------------------------------------------------------------------------


def test_worker_threads_leave_the_callers_thread_settings(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(blocks, "CHUNK_THREADS", 2)
        seen = []
        out = blocks.parallel_chunks(lambda s: (seen.append(torch.get_num_threads()), list(range(s.start, s.stop)))[1], 64)
        assert sum(out, []) == list(range(64)) and len(out) == 2
        assert seen == [1, 1]  # each of the 2 workers ran its calls on 2 // 2 threads
        assert torch.get_num_threads() == 2
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert fresh == [2]  # torch's default for new threads restored
    finally:
        torch.set_num_threads(before)


def test_chunk_threads_env_is_checked(monkeypatch):
    monkeypatch.delenv("DEVEC_CHUNK_THREADS", raising=False)
    assert blocks._chunk_threads_from_env() is None  # unset: auto (torch's thread count)
    monkeypatch.setenv("DEVEC_CHUNK_THREADS", "auto")
    assert blocks._chunk_threads_from_env() is None
    monkeypatch.setenv("DEVEC_CHUNK_THREADS", "3")
    assert blocks._chunk_threads_from_env() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("DEVEC_CHUNK_THREADS", bad)
        with pytest.raises(ValueError, match="DEVEC_CHUNK_THREADS"):
            blocks._chunk_threads_from_env()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_answer_does_not_depend_on_worker_threads(threads, monkeypatch):
    pool = mixed_pool(seed=5, dtype=torch.float32, copies=8)
    monkeypatch.setattr(blocks, "CHUNK_THREADS", 1)
    one = decompose(pool, tau=PAPER_TAU)
    monkeypatch.setattr(blocks, "CHUNK_THREADS", threads)
    monkeypatch.setattr(blocks, "MIN_PIECE", 1)  # split even 3-module blocks
    other = decompose(pool, tau=PAPER_TAU)
    assert one.shared_dims() == other.shared_dims()
    for v in pool:
        a, b = one.component("unique", v.name), other.component("unique", v.name)
        assert all(rel(b[m].dense(F64), a[m].dense(F64)) <= 1e-6 for m in a)
    assert math.isfinite(sum(r["norms"]["v0"]["unique"] for r in other.summary()))


# --------------------------------------------------------------------------------------------
# One queue of pieces over all blocks: order, errors, progress
# --------------------------------------------------------------------------------------------


def test_parallel_tasks_keep_list_order_and_raise_the_first_failure_after_all_ended():
    ended, done_in = [], []
    caller = threading.get_ident()

    def task(i):
        def run():
            if i in (3, 5):
                raise ValueError(f"task {i}")
            ended.append(i)
            return i * i
        return run

    assert blocks.parallel_tasks([task(i) for i in (0, 1, 2)], 2, lambda i: done_in.append(threading.get_ident())) == [0, 1, 4]
    assert done_in == [caller] * 3  # progress is reported in the calling thread
    ended.clear()
    with pytest.raises(ValueError, match="task 3"):
        blocks.parallel_tasks([task(i) for i in range(8)], 2)
    assert sorted(ended) == [0, 1, 2, 4, 6, 7]  # every other task ran to its end first


def test_parallel_tasks_stop_starting_tasks_when_progress_raises():
    """A caller aborting through its progress callback: the queued tasks are dropped, not run."""
    import time

    ran = []

    def task(i):
        return lambda: (time.sleep(0.02), ran.append(i))

    def cancel(i):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        blocks.parallel_tasks([task(i) for i in range(40)], 2, cancel)
    assert 1 <= len(ran) <= 4  # the tasks running when it raised, not the other 36+


def test_pieces_raise_the_error_a_serial_run_raises(monkeypatch):
    """NaN in two modules of different pieces: with the queue on 3 workers (pieces of one module,
    costliest first), the error names the same module as the serial run: the earliest in pool order."""
    pool = mixed_pool(seed=6, dtype=torch.float32, copies=8)
    mods = sorted(pool[1].modules)
    for mod in (mods[-1], mods[2]):
        pool[1].modules[mod].B[0, 0] = float("nan")
    monkeypatch.setattr(blocks, "CHUNK_THREADS", 1)
    with pytest.raises(ValueError) as serial:
        decompose(pool, tau=PAPER_TAU)
    monkeypatch.setattr(blocks, "CHUNK_THREADS", 3)
    monkeypatch.setattr(blocks, "MIN_PIECE", 1)
    with pytest.raises(ValueError) as queued:
        decompose(pool, tau=PAPER_TAU)
    assert str(queued.value) == str(serial.value) and "NaN" in str(serial.value)


def test_progress_counts_each_block_once_when_pieces_run_out_of_order(monkeypatch):
    pool = mixed_pool(seed=7, dtype=torch.float32, copies=8)
    monkeypatch.setattr(blocks, "CHUNK_THREADS", 3)
    monkeypatch.setattr(blocks, "MIN_PIECE", 1)
    seen = []
    dec = decompose(pool, tau=PAPER_TAU, progress=lambda d, t, s: seen.append((d, t)))
    total = sum(len(b.modules) for b in dec.blocks)
    steps = [d for d, _ in seen]
    assert steps == sorted(steps) and steps[-1] == total and len(seen) == len(dec.blocks)
    assert {d - e for d, e in zip(steps, [0] + steps)} <= {len(b.modules) for b in dec.blocks}


def test_concurrent_decompositions_equal_sequential_ones(monkeypatch):
    """Several callers (the app's users) decomposing at once, each with its own queue of pieces:
    every result equals the same pool decomposed alone, and the callers' thread counts are kept."""
    monkeypatch.setattr(blocks, "MIN_PIECE", 1)
    pools = [mixed_pool(seed=s, dtype=torch.float32, copies=6) for s in (1, 2, 3)]
    alone = [decompose(p, tau=PAPER_TAU) for p in pools]
    together, threads = [None] * 3, [None] * 3

    def run(i):
        together[i] = decompose(pools[i], tau=PAPER_TAU)
        threads[i] = torch.get_num_threads()

    before = torch.get_num_threads()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert torch.get_num_threads() == before and None not in threads
    for a, b, pool in zip(alone, together, pools):
        assert a.shared_dims() == b.shared_dims()
        for v in pool:
            ua, ub = a.component("unique", v.name), b.component("unique", v.name)
            assert all(rel(ub[m].dense(F64), ua[m].dense(F64)) <= 1e-6 for m in ua)
