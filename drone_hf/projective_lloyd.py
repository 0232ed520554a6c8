"""The Lloyd iterations behind [`projective_clustering`]: k-means++-style seeding for subspaces, float64 Gram
updates of the rows that moved, top-`j` eigenvector refits and chunked residuals. Inputs are validated by the caller.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch


_CHUNK_ELEMENTS = 1 << 24  # caps the (rows x k*j) projection block held at once: 64 MiB in float32


def _total(residuals: torch.Tensor, w: torch.Tensor | None) -> float:
    # float64 accumulation: summing 30k float32 residuals in float32 loses the digits the monotonicity check needs.
    r = residuals.double()
    return float(r.sum() if w is None else (r * w).sum())


def _eigenvectors(grams: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (ascending eigenvalues) of a batch of symmetric matrices."""
    threads = torch.get_num_threads()
    if grams.device.type != "cpu" or threads == 1 or grams.shape[-1] < 256:
        return torch.linalg.eigh(grams).eigenvectors
    # MKL's multi-threaded eigh collapses when the cores are oversubscribed (8 x 768^2 went from 0.8 s to 11 s on 2
    # shared cores): one thread per matrix, parallel across clusters. The setting is process-wide, hence restored;
    # small matrices skip this since re-spawning the thread pool costs more than they do.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, grams.shape[0])) as pool:
            return torch.stack([out.eigenvectors for out in pool.map(torch.linalg.eigh, grams.unbind(0))])
    finally:
        torch.set_num_threads(threads)


def _fit(grams: torch.Tensor, j: int, complement: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`j` eigenvectors (strongest first) of each Gram, and the frame the residuals are measured with."""
    vecs = _eigenvectors(grams)
    bases = vecs[..., -j:].flip(-1).transpose(-1, -2)
    return bases, (vecs[..., :-j].transpose(-1, -2) if complement else bases)


def _residuals(x: torch.Tensor, sq_norms: torch.Tensor, frames: torch.Tensor, complement: bool) -> torch.Tensor:
    """Squared distances `(n, c)` of the rows to `c` subspaces, in row chunks of bounded size."""
    c, m, _ = frames.shape
    flat = frames.reshape(c * m, -1).T.to(x.dtype)
    out = torch.empty(x.shape[0], c, dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // (c * m))
    for start in range(0, x.shape[0], step):
        energy = (x[start : start + step] @ flat).square_().view(-1, c, m).sum(-1)
        # For j > d / 2 the orthogonal complement is the smaller frame and gives the residual directly, without the
        # cancellation of ||a||^2 - ||a V^T||^2.
        out[start : start + step] = energy if complement else sq_norms[start : start + step, None] - energy
    return out.clamp_min_(0)


def _update_grams(grams, x, w, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Moves the rows that changed cluster between the float64 Grams; returns which clusters changed."""
    k, moved = grams.shape[0], (new != old).nonzero().flatten()
    touched = torch.zeros(k, dtype=torch.bool)
    # Only moved rows are touched: late Lloyd iterations move few rows, far cheaper than rebuilding n x d^2.
    for labels, sign in ((new[moved], 1.0), (old[moved], -1.0)):
        labels, order = labels.sort(stable=True)
        ids, labels = moved[order][labels >= 0], labels[labels >= 0]  # -1: not in any Gram yet
        rows = x[ids].double()
        weighted = rows if w is None else rows * w[ids, None]
        start = 0
        for c, stop in enumerate(torch.bincount(labels, minlength=k).cumsum(0).tolist()):
            if stop > start:
                grams[c].addmm_(weighted[start:stop].T, rows[start:stop], alpha=sign)
                touched[c] = True
            start = stop
    return touched


def _fill_empty(assign: torch.Tensor, own: torch.Tensor, w, k: int) -> torch.Tensor:
    """Gives each empty cluster the row of largest (weighted) residual whose cluster keeps another row."""
    # Alone in its cluster, that row lies in the refitted span: its residual drops to 0 and the cost cannot rise.
    counts = torch.bincount(assign, minlength=k)
    if bool((counts > 0).all()):
        return assign
    assign, score = assign.clone(), own.double() * (1.0 if w is None else w)
    for c in (counts == 0).nonzero().flatten().tolist():
        row = int(torch.where(counts[assign] > 1, score, -math.inf).argmax())  # first maximum: deterministic
        counts[assign[row]] -= 1
        counts[c] += 1
        assign[row], score[row] = c, -math.inf
    return assign


def _seed(x, sq_norms, w, k: int, j: int, complement: bool, init: str, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial assignments and each row's residual in its cluster (for the empty-cluster rule)."""
    n = x.shape[0]
    if init == "random":
        return torch.randint(k, (n,), generator=generator).to(x.device), sq_norms
    # k-means++ for subspaces: sample a seed row proportionally to its (weighted) residual to the subspaces so far and
    # fit a j-dim subspace to the rows best aligned with it. A quarter of a cluster gave 1-2% lower final costs than
    # n / k rows on the MiniLM embedding: wide neighbourhoods start every subspace near the global one.
    resid = torch.empty(n, k, dtype=x.dtype, device=x.device)
    nearest, size = sq_norms, min(n, max(2 * j, math.ceil(n / (4 * k))))
    for c in range(k):
        score = nearest.double().cpu() * (1.0 if w is None else w.cpu())
        score = score if float(score.sum()) > 0 else torch.ones(n, dtype=torch.float64)
        s = int(torch.multinomial(score, 1, generator=generator))
        cos2 = (x @ x[s]).square_() / (sq_norms * sq_norms[s]).clamp_min(torch.finfo(x.dtype).tiny)
        members = cos2.topk(size).indices
        rows = x[members].double()
        _, frame = _fit(((rows if w is None else rows * w[members, None]).T @ rows)[None], j, complement)
        resid[:, c] = _residuals(x, sq_norms, frame, complement)[:, 0]
        nearest = torch.minimum(nearest, resid[:, c])
    assign = resid.argmin(1)
    return assign, resid.gather(1, assign[:, None]).squeeze(1)


def _lloyd(x, sq_norms, w, k: int, j: int, complement: bool, assign, own, max_iter: int, tol: float):
    n, d = x.shape
    grams = torch.zeros(k, d, d, dtype=torch.float64, device=x.device)
    bases = torch.zeros(k, j, d, dtype=torch.float64, device=x.device)
    frames = torch.zeros(k, d - j if complement else j, d, dtype=torch.float64, device=x.device)
    resid = torch.empty(n, k, dtype=x.dtype, device=x.device)
    fitted = torch.full((n,), -1, dtype=torch.long, device=x.device)  # the assignment the Grams hold
    costs: list[float] = []
    best = (assign, bases)
    for _ in range(max_iter):
        assign = _fill_empty(assign, own, w, k)
        changed = _update_grams(grams, x, w, assign, fitted).nonzero().flatten().to(x.device)
        fitted = assign
        if changed.numel():  # untouched clusters keep their bases and their column of residuals
            bases[changed], frames[changed] = _fit(grams[changed], j, complement)
            resid[:, changed] = _residuals(x, sq_norms, frames[changed], complement)
        assign = resid.argmin(1)
        own = resid.gather(1, assign[:, None]).squeeze(1)
        cost = _total(own, w)
        if costs and cost > costs[-1]:
            break  # exact Lloyd cannot go up, only rounding can: keep the previous state
        converged = bool(costs) and costs[-1] - cost <= tol * costs[-1]
        costs.append(cost)
        best = (assign, bases.clone())
        if converged or cost == 0.0 or torch.equal(assign, fitted):
            break
    return best[0], best[1], costs
