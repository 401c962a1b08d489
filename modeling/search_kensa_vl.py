"""Nearest-cell search for KensaVL's reference comparison: exact in cache-sized blocks (`nearest_distances`), an
inverted file for large banks (`InvertedLists`, `inverted_file_similarity`), PatchCore's greedy coreset (`coreset`),
and the caches that keep repeated searches (`PairCache` in training, `SearchMemo` in evaluation).

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .configuration_kensa_vl import check_coreset

# The approximate search (`inverted_file_similarity`): a bank is split into lists of about LIST_CELLS cells around
# spherical k-means centroids (KMEANS_ITERATIONS rounds on at most KMEANS_SAMPLE cells per list, seeded: the same bank
# gives the same lists), and each query cell is compared with the cells of its `probes` nearest lists only.
LIST_CELLS, KMEANS_ITERATIONS, KMEANS_SAMPLE = 256, 4, 32
CORESET_ROUNDS = 32  # `coreset`: rounds of the greedy k-center choice


def coreset(cells: torch.Tensor, ratio: float, rounds: int = CORESET_ROUNDS) -> torch.Tensor:
    """PatchCore's greedy k-center coreset of unit `cells` (M, C): `ceil(ratio * M)` of them, chosen so that every
    cell lies near a chosen one. The first is the cell farthest from the cells' mean; each later one the cell
    farthest (cosine) from those chosen. To take one matrix product per round instead of one per cell, a round
    (about `rounds` in all) takes the greedy choice among the farthest cells left, as long as each pick stays
    farther from the chosen ones than the round's cut (so two picks of one far cluster do not waste a place). A
    ratio of 1 keeps every cell, in order. The choice carries no gradient; the kept cells do."""
    keep = math.ceil(check_coreset(ratio) * len(cells))
    if keep >= len(cells):
        return cells
    return cells[greedy_centres(cells.detach(), keep, rounds)]


@torch.no_grad()
def greedy_centres(cells: torch.Tensor, keep: int, rounds: int) -> torch.Tensor:
    """The rows of `coreset`'s choice: `(keep,)` indices into `cells`."""
    per_round = -(-keep // rounds)
    chosen = [(cells @ F.normalize(cells.mean(0), dim=0)).argmin().view(1)]
    nearest = cells @ cells[chosen[0]].T.squeeze(-1)  # each cell's similarity to its nearest chosen cell
    count = 1
    while count < keep:
        pool = nearest.topk(min(len(cells), 4 * per_round), largest=False)
        near, cut, picked = pool.values.cpu().numpy().copy(), pool.values[-1].item(), []
        inner = (cells[pool.indices] @ cells[pool.indices].T).cpu().numpy()  # small: picked one by one, off torch
        while len(picked) < min(per_round, keep - count):
            j = int(near.argmin())
            if picked and near[j] >= cut:
                break
            picked.append(j)
            near = near.clip(min=inner[j])  # the elementwise max
            near[j] = 2.0
        new = pool.indices[picked]
        chosen.append(new)
        count += len(picked)
        nearest = torch.maximum(nearest, torch.cat([(part @ cells[new].T).amax(-1) for part in cells.split(16384)]))
    return torch.cat(chosen)


@torch.no_grad()  # a fixed metric (PatchCore's): no gradient flows through the nearest-neighbour search
def nearest_distances(
    query: torch.Tensor,
    bank: torch.Tensor,
    chunk: int | None = None,
    probes: int = 0,
    lists: InvertedLists | None = None,
) -> torch.Tensor:
    """Cosine distance of each cell of `query` (n, g, g, C), L2-normalised, to its nearest cell in `bank` (M, C),
    L2-normalised: `(n, g, g)`, at least 0. Exact by default: the similarities are taken in `chunk x chunk` blocks
    (`search_chunk`) with a running max, never as one (cells, M) matrix: 4x faster on a CPU at 448 px tiles (it stays
    in cache) and bounded memory (BENCHMARKS.md). With `probes` > 0 and a bank of more than `probes` lists, approximate
    (`inverted_file_similarity`, on `lists` when the bank's are already built): a cell's nearest may be missed, so a
    distance is never smaller than the exact one."""
    flat = query.reshape(-1, query.shape[-1]).to(bank.dtype)
    chunk = chunk or search_chunk(flat.device)
    if probes and len(bank) > probes * LIST_CELLS:
        best = inverted_file_similarity(flat, lists or InvertedLists.build(bank), probes, chunk)
    elif SearchMemo.current is not None:
        best = SearchMemo.current.search(flat, bank, chunk)
    else:
        best = exact_similarity(flat, bank, chunk)
    return (1 - best).clamp_min(0).view(query.shape[:-1])


class SearchMemo:
    """Exact searches kept by their inputs' contents while this memo is `SearchMemo.current` (eval's
    `shared_searches`): an evaluation that searches the same query cells against the same bank twice (the model's
    judgement of a query, then the kNN baseline's on the same supports and weight-free cells) searches once, and
    gets the same result, the same search of the same bytes. The results are packed in a `PairCache`'s slabs (a first
    version kept each as its own small tensor and fragmented the heap: the main job peaked at 14.3 GiB against
    3.1). A bank's digest is kept for the last `BANKS` bank tensors (a support set's bank serves all its queries).
    Off by default; training has `PairCache`."""

    current: SearchMemo | None = None
    BANKS = 4

    def __init__(self, max_bytes: int = 2**30):
        self.found = PairCache(max_bytes)
        self.banks: OrderedDict[int, tuple[torch.Tensor, str]] = OrderedDict()  # id -> (the tensor, kept; digest)

    @property
    def hits(self) -> int:
        return self.found.hits

    @property
    def misses(self) -> int:
        return self.found.misses

    def _bank_key(self, bank: torch.Tensor) -> str:
        kept = self.banks.get(id(bank))
        if kept is None or kept[0] is not bank:
            kept = self.banks[id(bank)] = (bank, PairCache.key(bank))
            while len(self.banks) > self.BANKS:
                self.banks.popitem(last=False)
        self.banks.move_to_end(id(bank))
        return kept[1]

    def search(self, flat: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
        key = (PairCache.key(flat), self._bank_key(bank))
        found = self.found.get(key)
        if found is None:
            self.found.misses += 1
            found = exact_similarity(flat, bank, chunk)
            self.found.put(key, found)
        else:
            self.found.hits += 1
        return found


def search_chunk(device: torch.device) -> int:
    """The side of the exact search's blocks: 2048 on a CPU (a block stays in cache), 16384 on a GPU (1 GiB of
    float32 similarities: 2048 x 2048 blocks leave an H200 waiting on thousands of small kernel launches)."""
    return 2048 if device.type == "cpu" else 16384


def exact_similarity(flat: torch.Tensor, bank: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Each row of `flat` (N, C): its largest dot product with a row of `bank` (M, C), in `chunk x chunk` blocks."""
    chunk = chunk or search_chunk(flat.device)
    return torch.cat([block_similarity(part, bank, chunk) for part in flat.split(chunk)])


def block_similarity(part: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each row of `part` (N, C): its largest dot product with a row of `bank` (M, C), `chunk` bank rows at a time."""
    best = None
    for block in bank.split(chunk):
        similarity = (part @ block.T).amax(-1)
        best = similarity if best is None else torch.maximum(best, similarity)
    return best


class PairCache:
    """Exact nearest-cell similarities of one image's cells to another image's bank cells, kept by the two images'
    contents across calls: what training repeats. A search against several reference images is the elementwise max
    of the searches against each, so an image pair met in an earlier episode is not searched again (the main job's
    episodes meet each pair about 3.8 times). Valid only while the compared encoders stay as they are: training
    sets it (`KensaVLReferenceComparison.pair_cache`) only when they have nothing to train.

    The similarities are packed into slabs of `slab_bytes` (thousands of small tensors kept between large transient
    ones fragment the allocator's heap: a first version grew the main job past 24 GiB); at most `max_bytes` of
    slabs are kept, the oldest slab and its pairs dropped first."""

    def __init__(self, max_bytes: int = 2**30, slab_bytes: int = 2**26):
        self.max_bytes, self.slab = max_bytes, max(1, min(slab_bytes, max_bytes) // 4)
        self.slabs: OrderedDict[int, tuple[torch.Tensor, list]] = OrderedDict()  # id -> (floats, its pair keys)
        self.pairs: dict = {}  # key -> (slab id, start, length)
        self.used, self.next_id, self.hits, self.misses = 0, 0, 0, 0

    @property
    def bytes(self) -> int:
        return sum(floats.nbytes for floats, _ in self.slabs.values())

    @staticmethod
    def key(pixel_values: torch.Tensor) -> str:
        """An image's tiles `(n, 3, T, T)` (or any tensor) -> a digest of their contents and shape."""
        data = pixel_values.detach().contiguous().flatten().view(torch.uint8).cpu().numpy()
        return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest() + str(tuple(pixel_values.shape))

    def get(self, key) -> torch.Tensor | None:
        where = self.pairs.get(key)
        if where is None:
            return None
        slab, start, length = where
        return self.slabs[slab][0][start : start + length]

    def put(self, key, similarity: torch.Tensor) -> None:
        length = similarity.numel()
        if not self.slabs or self.used + length > len(self.slabs[self.next_id - 1][0]):
            while self.slabs and (len(self.slabs) + 1) * self.slab * 4 > self.max_bytes:
                for old in self.slabs.popitem(last=False)[1][1]:
                    del self.pairs[old]
            floats = similarity.new_empty(max(self.slab, length), dtype=torch.float32)
            self.slabs[self.next_id], self.used, self.next_id = (floats, []), 0, self.next_id + 1
        floats, keys = self.slabs[self.next_id - 1]
        floats[self.used : self.used + length] = similarity.flatten()
        keys.append(key)
        self.pairs[key] = (self.next_id - 1, self.used, length)
        self.used += length

    def nearest(self, query: torch.Tensor, query_key, references: list[tuple[str, Callable[[], torch.Tensor]]]):
        """`nearest_distances` of `query` (n, g, g, C), keyed by `query_key` (its image's `key` and the encoder's
        name), to the union of `references` (per reference image: its `key` and a function giving its bank cells
        (M, C), called only when the pair is new), searched exactly, pair by pair."""
        best = None
        for reference_key, bank_cells in references:
            key = (query_key, reference_key)
            similarity = self.get(key)
            if similarity is None:
                self.misses += 1
                cells = bank_cells()
                similarity = exact_similarity(query.reshape(-1, query.shape[-1]).to(cells.dtype), cells)
                self.put(key, similarity)
            else:
                self.hits += 1
            best = similarity if best is None else torch.maximum(best, similarity)
        return (1 - best).clamp_min(0).view(query.shape[:-1])


def spherical_kmeans(cells: torch.Tensor, lists: int, seed: int = 0) -> torch.Tensor:
    """`lists` unit centroids `(lists, C)` of unit `cells` (M, C): k-means on cosine similarity, started from and
    run on a seeded sample of the cells (at most KMEANS_SAMPLE per list)."""
    generator = torch.Generator().manual_seed(seed)
    sample = cells[torch.randperm(len(cells), generator=generator)[: lists * KMEANS_SAMPLE].to(cells.device)]
    centroids = sample[:lists].clone()
    for _ in range(KMEANS_ITERATIONS):
        owner = torch.cat([(part @ centroids.T).argmax(-1) for part in sample.split(8192)])
        sums = torch.zeros_like(centroids).index_add_(0, owner, sample)
        filled = torch.bincount(owner, minlength=lists)[:, None] > 0
        centroids = torch.where(filled, F.normalize(sums, dim=-1), centroids)
    return centroids


@dataclass
class InvertedLists:
    """A bank's cells grouped into lists of about LIST_CELLS around spherical k-means centroids: what
    `inverted_file_similarity` searches. `members` `(M, C)` holds the cells list by list, `sizes` their counts,
    `order` each member's row in the bank."""

    centroids: torch.Tensor
    members: torch.Tensor
    sizes: list[int]
    order: torch.Tensor

    @classmethod
    def build(cls, bank: torch.Tensor) -> InvertedLists:
        lists = max(1, len(bank) // LIST_CELLS)
        centroids = spherical_kmeans(bank, lists)
        owner = torch.cat([(part @ centroids.T).argmax(-1) for part in bank.split(8192)])
        order = owner.argsort()
        return cls(centroids, bank[order], torch.bincount(owner, minlength=lists).tolist(), order)

    def head(self, rows: int) -> InvertedLists:
        """The same lists holding only the bank's first `rows` cells (the earlier images of a support set)."""
        kept = self.order < rows
        owner = torch.repeat_interleave(torch.arange(len(self.sizes), device=kept.device), torch.tensor(self.sizes))
        sizes = torch.bincount(owner[kept], minlength=len(self.sizes)).tolist()
        return InvertedLists(self.centroids, self.members[kept], sizes, self.order[kept])


def approximate_pays(device: torch.device) -> bool:
    """Whether the approximate search beats the exact one on `device`: on a CPU (BENCHMARKS.md), not on a GPU, where
    its loop over thousands of lists costs more than the exact search's few large matrix products (an H200 at real
    size: BENCHMARKS.md, "GPU at real size")."""
    return device.type == "cpu"


def inverted_file_similarity(flat: torch.Tensor, lists: InvertedLists, probes: int, chunk: int) -> torch.Tensor:
    """Each query cell's largest similarity `(N,)` to the bank's cells in its `probes` nearest `lists` (an inverted
    file: FAISS's IVF-Flat, written in torch so the remote code needs nothing else). Costs about
    `probes * LIST_CELLS / M` of the exact search, plus a loop over the lists."""
    count = len(lists.sizes)
    live = (torch.tensor(lists.sizes, device=flat.device) > 0).nonzero().flatten()  # an empty list is never probed
    centroids, probes = lists.centroids[live], min(probes, len(live))
    probed = live[torch.cat([(part @ centroids.T).topk(probes, -1).indices for part in flat.split(8192)]).flatten()]
    visits = probed.argsort()  # (cell, probe) pairs grouped by list
    cell_of, visit_sizes = visits // probes, torch.bincount(probed, minlength=count)
    best = flat.new_full((len(flat),), -1.0)
    bank_start = visit_start = 0
    for size, visited in zip(lists.sizes, visit_sizes.tolist(), strict=True):
        if size and visited:
            cells = cell_of[visit_start : visit_start + visited]  # distinct: a cell probes a list once
            block = block_similarity(flat[cells], lists.members[bank_start : bank_start + size], chunk)
            best[cells] = torch.maximum(best[cells], block)
        bank_start, visit_start = bank_start + size, visit_start + visited
    return best
