"""Refine a patient-level fold assignment so that folds are balanced in VOLUMES.

Training and evaluation count volumes, but the stratifier (`ctprep.folds`) balances patients, and a
patient holds 1 to 4+ volumes (scans x reconstructions): on 60 patients / 139 volumes it left one
label at 15/11/6/9/8 positive volumes per fold. Here whole patients are moved and swapped between
folds (so the folds stay patient-disjoint by construction) to minimise

    J = LAMBDA * sum_m max(0, spread_m - allowed_m)^2  +  sum_{f,m} ((count[f,m] - even_m) / tol_m)^2

over the columns m = fold size, then each label's positive volumes: `spread` is max - min over
folds, `allowed` the target (fold sizes within 10 % of the mean; a label within max(2, 20 % of
its mean)), `even` the perfectly even share and `tol` = max(1, 10 % of it) (5 % for the size), a
squared relative deviation whose floor keeps a label with a handful of positives, which cannot be
split better than +-1, from outweighing the rest. The first term aims at the target; the second
keeps a gradient where the target is met or out of reach.

Search (iterated local search, Lourenco, Martin & Stuetzle, "Iterated Local Search", Handbook of
Metaheuristics, 2003): best-improvement moves (one patient to another fold) and swaps (two patients
of different folds), scored on the per-fold count matrix without recounting, from the stratified
start and from a greedy start (whole patients, largest first, each to the fold that raises J
least); then a fixed number of random kicks (a few swaps) each followed by local search, keeping
the best. Budgets are counts, not seconds, so the result is deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAMBDA = 100.0            # weight of the target term against the smooth one
MAX_SWEEPS = 60           # a sweep = every patient tried once for a move and once for a swap
SWAP_CANDIDATES = 64      # swap partners scored per patient (all of them in small sets)
MAX_KICKS = 40
KICK_WORK = 160_000       # kicks x patients x candidates: ~40 kicks for 60 patients, none for 1000s
KICK_SWAPS = 3


@dataclass
class _Problem:
    counts: np.ndarray    # (P, M) per patient: volumes, then positive volumes per label
    k: int
    even: np.ndarray      # (M,) perfectly even share per fold
    allowed: np.ndarray   # (M,) target max - min
    inv_tol: np.ndarray   # (M,) 1 / tolerance, 0 for empty columns
    active: np.ndarray    # (M,) column has any volume / positive

    def score(self, fold_counts: np.ndarray) -> np.ndarray:
        """J of one (k, M) or many (..., k, M) count matrices."""
        spread = fold_counts.max(-2) - fold_counts.min(-2)
        excess = np.maximum(0.0, spread - self.allowed) * self.active
        smooth = (((fold_counts - self.even) * self.inv_tol) ** 2).sum((-2, -1))
        return LAMBDA * (excess ** 2).sum(-1) + smooth

    def fold_counts(self, patient_fold: np.ndarray) -> np.ndarray:
        out = np.zeros((self.k, self.counts.shape[1]))
        np.add.at(out, patient_fold, self.counts)
        return out


def patient_counts(volume_patient: np.ndarray, labels: np.ndarray, n_patients: int) -> np.ndarray:
    """(P, 1 + L) per patient: its number of volumes, then its positive volumes per label."""
    per_volume = np.concatenate([np.ones((len(volume_patient), 1)), labels.astype(np.float64)], axis=1)
    out = np.zeros((n_patients, per_volume.shape[1]))
    np.add.at(out, volume_patient, per_volume)
    return out


def _problem(counts: np.ndarray, k: int) -> _Problem:
    even = counts.sum(0) / k
    allowed = np.floor(np.maximum(2.0, 0.2 * even) + 1e-9)
    allowed[0] = np.floor(0.1 * even[0] + 1e-9)
    tol = np.maximum(0.1 * even, 1.0)
    tol[0] = max(0.05 * even[0], 1.0)
    active = even > 0
    return _Problem(counts, k, even, allowed, np.where(active, 1.0 / tol, 0.0), active.astype(np.float64))


def objective(patient_fold: np.ndarray, counts: np.ndarray, k: int) -> float:
    """J of a patient -> fold assignment (0 = perfectly even)."""
    prob = _problem(counts, k)
    return float(prob.score(prob.fold_counts(patient_fold)))


def greedy_assignment(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Whole patients, most volumes first (ties in seeded order), each to the fold where J rises least."""
    prob = _problem(counts, k)
    order = np.lexsort((rng.permutation(len(counts)), -counts[:, 0]))
    fold_counts = np.zeros((k, counts.shape[1]))
    out = np.empty(len(counts), dtype=np.int64)
    eye = np.eye(k)[:, :, None]
    for p in order:
        f = int(np.argmin(prob.score(fold_counts[None] + eye * counts[p])))
        out[p] = f
        fold_counts[f] += counts[p]
    return out


def _local_search(prob: _Problem, fold: np.ndarray, rng: np.random.Generator, swap_candidates: int
                  ) -> tuple[np.ndarray, float]:
    """Best-improvement moves and swaps until a sweep improves nothing; no fold is emptied.

    For each patient p (of fold f) one batch holds the k move candidates (p to fold g) and the
    swap candidates (p with q of another fold), scored in one call: the batch is what costs."""
    fold = fold.copy()
    counts, k = prob.counts, prob.k
    fold_counts = prob.fold_counts(fold)
    current = float(prob.score(fold_counts))
    members = np.bincount(fold, minlength=k)
    shift = (np.eye(k)[:, None, :] - np.eye(k)[None, :, :])[..., None]   # [a, b]: row a +1, row b -1
    for _ in range(MAX_SWEEPS):
        improved = False
        for p in rng.permutation(len(fold)):
            f, v = fold[p], counts[p]
            others = np.flatnonzero(fold != f)
            if others.size > swap_candidates:
                others = rng.choice(others, swap_candidates, replace=False)
            change = counts[others] - v                          # swap: fold f gains it, fold[q] loses it
            cand = np.concatenate([fold_counts[None] + shift[:, f] * v,
                                   fold_counts[None] + shift[f, fold[others]] * change[:, None, :]])
            scores = prob.score(cand)
            scores[f] = np.inf                                   # "move" to its own fold
            if members[f] == 1:
                scores[:k] = np.inf                              # moving its last patient empties f
            best = int(np.argmin(scores))
            if scores[best] >= current - 1e-9:
                continue
            fold_counts, current, improved = cand[best], float(scores[best]), True
            if best < k:
                fold[p] = best
                members[f] -= 1
                members[best] += 1
            else:
                q = others[best - k]
                fold[p], fold[q] = fold[q], f
        if not improved:
            break
    return fold, current


def _kick(fold: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few random swaps of patients (fold membership counts are kept): leaves the local optimum's
    basin."""
    out = fold.copy()
    for _ in range(KICK_SWAPS):
        p, q = rng.choice(len(out), 2, replace=False)
        out[p], out[q] = out[q], out[p]
    return out


def balance(start: np.ndarray, volume_patient: np.ndarray, labels: np.ndarray, k: int, seed: int
            ) -> np.ndarray:
    """Patient -> fold, refined from `start` (see the module docstring)."""
    counts = patient_counts(volume_patient, labels, len(start))
    prob = _problem(counts, k)
    rng = np.random.default_rng([seed, 9])
    swaps = min(len(start), SWAP_CANDIDATES)
    runs = [_local_search(prob, np.asarray(start, dtype=np.int64), rng, swaps)]
    if len(start) >= k:
        runs.append(_local_search(prob, greedy_assignment(counts, k, rng), rng, swaps))
    best, best_score = min(runs, key=lambda r: r[1])
    kicks = min(MAX_KICKS, KICK_WORK // (len(start) * (k + swaps)))
    for _ in range(kicks):
        if best_score <= 0.0:
            break
        fold, score = _local_search(prob, _kick(best, rng), rng, swaps)
        if score < best_score - 1e-9:
            best, best_score = fold, score
    return best


def spread(volume_fold: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(max - min positive volumes per fold, mean per fold) for each label."""
    onehot = np.eye(k, dtype=np.int64)[volume_fold]
    positives = onehot.T @ labels.astype(np.int64)              # (k, L)
    return positives.max(0) - positives.min(0), positives.mean(0)
