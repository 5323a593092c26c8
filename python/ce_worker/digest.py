"""Tensor digests (docs/digest.md), computed with plain torch integer ops on the tensor's device.

The definition, which libce computes on threads over pinned host memory (csrc/digest.c):

    w_i = the int32 read little-endian from bytes 4i..4i+3 (zero-padded past the end)
    S   = sum_i w_i * (2i + 1)                mod 2^64
    x   = S + 0x9E3779B97F4A7C15 * (L + 1)    mod 2^64     (L: the tensor's byte length)
    digest = fmix64(x)                                     (MurmurHash3's finalizer)

On the GPU no intermediate value ever leaves int64's range, so nothing relies on int64 wrapping:
the words are laid out as chunks of ROWS x COLS (2^22 words, 16 MiB), and per chunk k

    rho_r = sum_c w[r, c]
    gam_c = sum_r w[r, c]
    T_k = sum_r rho_r,  A_k = sum_r r * rho_r,  B_k = sum_c c * gam_c

are exact (|A_k|, |B_k| < 2^63), and with i = (k*ROWS + r)*COLS + c

    S = sum_k (2*k*ROWS*COLS + 1) * T_k + 2*COLS*A_k + 2*B_k     mod 2^64

is finished in Python integers from the few values per 16 MiB (one device-to-host copy per call
of tensor_digests, or per collect_digests of many launched batches). The part of a tensor past its
last whole chunk (all of a tensor under 16 MiB) is zero-padded to whole rows and reduced together
with the other such parts of the same row count, so a bucket of thousands of small tensors costs a
few kernel launches per 64 MiB, not a dozen per tensor.

A pass over a 64 MiB piece casts it to int64 once (torch's sum(dtype=int64) of int32 would make
that copy anyway, once per reduction) and reduces the copy twice: about 7x the tensor's bytes in
memory traffic, and at most ~200 MiB of temporaries beyond the tensors (a group's padded copy and
its cast; plus a copy of a piece whose bytes do not start 4-aligned, and of a whole non-contiguous
tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

MASK = (1 << 64) - 1
LENGTH_K = 0x9E3779B97F4A7C15
COLS = 2048
ROWS = 2048
CHUNK_WORDS = ROWS * COLS
# Chunks reduced per pass: bounds the temporaries of one pass to a 64 MiB piece.
PIECE_CHUNKS = 4


def fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finalizer: a bijection of 64-bit values."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK
    k ^= k >> 33
    return k


def finish(weighted_sum: int, nbytes: int) -> int:
    """The digest from S (any integer; taken mod 2^64) and the byte length L."""
    return fmix64((weighted_sum + LENGTH_K * (nbytes + 1)) & MASK)


def format_digest(digest: int) -> str:
    """16 lowercase hex digits, as digests travel in frames and logs."""
    return f"{digest:016x}"


def parse_digest(text: str) -> int:
    if len(text) != 16 or any(ch not in "0123456789abcdef" for ch in text):
        raise ValueError(f"digest {text!r} is not 16 lowercase hex digits")
    return int(text, 16)


def reference_digest(data: bytes) -> int:
    """The definition word by word, in pure Python: the spec's reference, for tiny inputs and tests."""
    s = 0
    for i in range((len(data) + 3) // 4):
        word = data[4 * i:4 * i + 4].ljust(4, b"\0")
        s += int.from_bytes(word, "little", signed=True) * (2 * i + 1)
    return finish(s, len(data))


def tensor_digest(t: torch.Tensor) -> int:
    """The digest of a tensor's bytes (any dtype, CPU or CUDA), as int. Syncs with its device."""
    return tensor_digests([t])[0]


def tensor_digests(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Digests of many tensors with one device-to-host copy per device (verify of a whole bucket)."""
    return collect_digests([launch_digests(tensors)])[0]


@dataclass(frozen=True)
class Launched:
    """Digests of some tensors, reduced on their devices to a few sums per 16 MiB and not yet finished.

    It holds only those sums, never the tensors: a worker launches the digests of a slot's views,
    hands the slot back, and collects them at the end of the update, with one host sync for all.
    """

    nbytes: List[int]
    parts: List[List[Tuple[int, torch.device, int]]]  # per tensor: (first chunk, device, rows in its sums)
    sums: Dict[torch.device, torch.Tensor]  # [rows, 3] int64 per device, the tensors' rows in order


def launch_digests(tensors: Sequence[torch.Tensor]) -> Launched:
    """Start the digests of `tensors` on their devices' current streams; no host sync.

    Whole 16 MiB chunks are reduced a 64 MiB piece at a time. What is left of each tensor (all of
    a tensor under 16 MiB) is zero-padded to whole rows and reduced together with the other
    remainders of its device and row count, up to 64 MiB at a time: a kernel launch per group
    rather than per tensor, for checkpoints of thousands of small tensors (norms, biases, MoE experts).
    """
    chunk_bytes, row_bytes = 4 * CHUNK_WORDS, 4 * COLS
    parts: List[List[Tuple[int, torch.Tensor]]] = []
    nbytes: List[int] = []
    rests: Dict[Tuple[torch.device, int], List[Tuple[int, int, torch.Tensor]]] = {}  # (device, rows) -> (tensor, chunk, bytes)
    for i, t in enumerate(tensors):
        b = _as_bytes(t)
        nbytes.append(b.numel())
        parts.append(_whole_chunks(b))
        whole = b.numel() // chunk_bytes
        rest = b[whole * chunk_bytes:]
        if rest.numel():
            rows = -(-rest.numel() // row_bytes)
            rests.setdefault((b.device, rows), []).append((i, whole, rest))
    for (device, rows), members in rests.items():
        padded = rows * row_bytes
        zeros = torch.zeros(padded, dtype=torch.uint8, device=device)
        per = max(1, PIECE_CHUNKS * chunk_bytes // padded)
        for s in range(0, len(members), per):
            group = members[s:s + per]
            pieces = []
            for _, _, rest in group:
                pieces.append(rest)
                if rest.numel() < padded:
                    pieces.append(zeros[:padded - rest.numel()])
            sums = _chunk_sums(torch.cat(pieces).view(torch.int32).view(len(group), rows, COLS))
            for j, (i, k0, _) in enumerate(group):
                parts[i].append((k0, sums[j:j + 1]))
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for ps in parts:
        for _, p in ps:
            by_device.setdefault(p.device, []).append(p)
    return Launched(nbytes=nbytes,
                    parts=[[(k0, p.device, p.shape[0]) for k0, p in ps] for ps in parts],
                    sums={dev: torch.cat(ps) for dev, ps in by_device.items()})


def collect_digests(batches: Sequence[Launched]) -> List[List[int]]:
    """Finish launched digests, per batch in order, with one device-to-host copy per device for all."""
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for batch in batches:
        for dev, sums in batch.sums.items():
            by_device.setdefault(dev, []).append(sums)
    values: Dict[torch.device, List[List[int]]] = {
        dev: torch.cat(ss).cpu().tolist() for dev, ss in by_device.items()
    }
    taken = {dev: 0 for dev in values}
    out = []
    for batch in batches:
        digests = []
        for nbytes, parts in zip(batch.nbytes, batch.parts):
            s = 0
            for k0, dev, n in parts:
                rows = values[dev][taken[dev]:taken[dev] + n]
                taken[dev] += n
                for k, (t_k, a_k, b_k) in enumerate(rows, start=k0):
                    s += (2 * k * CHUNK_WORDS + 1) * t_k + 2 * COLS * a_k + 2 * b_k
            digests.append(finish(s, nbytes))
        out.append(digests)
    return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (a copy only when it is not contiguous)."""
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _words(b: torch.Tensor, start: int, nwords: int) -> torch.Tensor:
    """nwords int32 words of b from byte start (4-aligned in the tensor); copied when not 4-aligned in memory."""
    seg = b[start:start + 4 * nwords]
    if (seg.storage_offset() % 4) != 0:
        seg = seg.clone()
    return seg.view(torch.int32)


_INDEX: Dict[Tuple[torch.device, int], torch.Tensor] = {}


def _index(device: torch.device, n: int) -> torch.Tensor:
    key = (device, n)
    if key not in _INDEX:
        _INDEX[key] = torch.arange(n, dtype=torch.int64, device=device)
    return _INDEX[key]


def _chunk_sums(x: torch.Tensor) -> torch.Tensor:
    """[K, R, C] int32 words -> [K, 3] int64 (T, A, B) per chunk, exact."""
    x = x.to(torch.int64)
    rho = x.sum(dim=2)
    gam = x.sum(dim=1)
    r = _index(x.device, x.shape[1])
    c = _index(x.device, x.shape[2])
    return torch.stack([rho.sum(dim=1), (rho * r).sum(dim=1), (gam * c).sum(dim=1)], dim=1)


def _whole_chunks(b: torch.Tensor) -> List[Tuple[int, torch.Tensor]]:
    """[(first chunk index, [K, 3] sums)] of the whole 16 MiB chunks of b, a 64 MiB piece at a time."""
    full_chunks = b.numel() // (4 * CHUNK_WORDS)
    parts: List[Tuple[int, torch.Tensor]] = []
    for k0 in range(0, full_chunks, PIECE_CHUNKS):
        k = min(PIECE_CHUNKS, full_chunks - k0)
        x = _words(b, 4 * k0 * CHUNK_WORDS, k * CHUNK_WORDS).view(k, ROWS, COLS)
        parts.append((k0, _chunk_sums(x)))
    return parts
