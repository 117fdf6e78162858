"""Rank 0 sends each step's inputs to the other tensor-parallel ranks: a header, then one packed buffer.

Both go over a gloo group on CPU tensors (also when the model's all-reduces use NCCL), on the
CPU side of ``launch``, outside any CUDA graph replay. The header is a fixed-size int64 tensor
(message kind, sizes, flags, payload length); the payload is every array of the step's
:class:`StepArrays` back to back in one int64 tensor, the float32 sampling arrays reinterpreted
as int64 words. A stop message is a header alone.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .step_inputs import FLOAT_FIELDS, MAX_SUPPRESS, ROW_FIELDS, TOKEN_FIELDS, StepArrays

HEADER_LEN = 16
IDLE_TIMEOUT = timedelta(days=365)
"""A follower waits this long for rank 0's next step (rank 0 may stay idle between requests)."""
_STEP, _STOP = 1, 2


def pack(a: StepArrays) -> tuple[list[int], np.ndarray]:
    """The header fields (without the kind) and the int64 payload of one step."""
    floats = np.concatenate([getattr(a, f) for f in FLOAT_FIELDS]).astype(np.float32)
    if len(floats) % 2:
        floats = np.append(floats, np.float32(0))
    parts = [getattr(a, f) for f in TOKEN_FIELDS]
    parts += [a.context_lens, *(getattr(a, f) for f in ROW_FIELDS), a.suppress.ravel()]
    parts += [a.block_tables.ravel(), floats.view(np.int64)]
    payload = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    sizes = [a.num_tokens, a.num_seqs, a.num_sampled, a.block_tables.shape[1]]
    flags = [a.max_query_len, a.max_context_len, a.any_sampling, a.any_top_k_top_p, a.any_min_p]
    return [*sizes, *(int(f) for f in flags), len(payload)], payload


def unpack(header: list[int], payload: np.ndarray) -> StepArrays:
    """The step that ``pack`` packed; its arrays are views of ``payload``."""
    t, s, r, width, max_q, max_ctx, any_s, any_tkp, any_mp, _ = header
    out: dict = {}
    pos = 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        pos += n
        return payload[pos - n : pos]

    for f in TOKEN_FIELDS:
        out[f] = take(t)
    out["context_lens"] = take(s)
    for f in ROW_FIELDS:
        out[f] = take(r)
    out["suppress"] = take(r * MAX_SUPPRESS).reshape(r, MAX_SUPPRESS)
    out["block_tables"] = take(s * width).reshape(s, width)
    floats = payload[pos:].view(np.float32)
    for i, f in enumerate(FLOAT_FIELDS):
        out[f] = floats[i * r : (i + 1) * r]
    return StepArrays(
        **out,
        max_query_len=max_q,
        max_context_len=max_ctx,
        any_sampling=bool(any_s),
        any_top_k_top_p=bool(any_tkp),
        any_min_p=bool(any_mp),
    )


def broadcast(group, tensor: torch.Tensor, src: int, timeout: timedelta | None = None) -> None:
    """``tensor`` from rank ``src`` to every rank of ``group`` (a process group or backend object)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = src, 0
    if timeout is not None:
        opts.timeout = timeout
    group.broadcast([tensor], opts).wait()


class StepChannel:
    """Broadcasts of step inputs from rank 0 over ``group`` (gloo)."""

    def __init__(self, group, src: int = 0) -> None:
        self.group, self.src = group, src
        self.header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        self.buffer = torch.zeros(1 << 16, dtype=torch.int64)

    def send(self, a: StepArrays) -> None:
        fields, payload = pack(a)
        self.header[0] = _STEP
        self.header[1 : 1 + len(fields)] = torch.tensor(fields)
        broadcast(self.group, self.header, self.src)
        broadcast(self.group, torch.from_numpy(payload), self.src)

    def send_stop(self) -> None:
        self.header.zero_()
        self.header[0] = _STOP
        broadcast(self.group, self.header, self.src)

    def recv(self) -> StepArrays | None:
        """The next step, or None on a stop message. Its arrays are valid until the next ``recv``."""
        broadcast(self.group, self.header, self.src, IDLE_TIMEOUT)
        header = self.header.tolist()
        if header[0] == _STOP:
            return None
        if header[0] != _STEP:
            raise RuntimeError(f"tensor parallel: unknown message kind {header[0]} from rank {self.src}")
        fields = header[1:11]
        n = fields[-1]
        if n > len(self.buffer):
            self.buffer = torch.zeros(max(n, 2 * len(self.buffer)), dtype=torch.int64)
        view = self.buffer[:n]
        broadcast(self.group, view, self.src)
        return unpack(fields, view.numpy())
