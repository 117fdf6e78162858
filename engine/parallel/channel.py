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

from engine.runner.step_layout import FLAGS, FLOAT_FIELDS, INT_FIELDS, MAX_SUPPRESS, StepArrays, field_lengths

HEADER_LEN = 16
IDLE_TIMEOUT = timedelta(days=365)
"""A follower waits this long for rank 0's next step (rank 0 may stay idle between requests)."""
_STEP, _STOP = 1, 2


def pack(a: StepArrays) -> tuple[list[int], np.ndarray]:
    """The header fields (without the kind) and the int64 payload of one step (``step_layout`` order)."""
    floats = np.concatenate([getattr(a, f.name) for f in FLOAT_FIELDS]).astype(np.float32)
    if len(floats) % 2:
        floats = np.append(floats, np.float32(0))
    parts = [np.asarray(getattr(a, f.name), dtype=np.int64).ravel() for f in INT_FIELDS]
    payload = np.concatenate([*parts, floats.view(np.int64)])
    return [*a.sizes, *(int(getattr(a, f)) for f in FLAGS), len(payload)], payload


def unpack(header: list[int], payload: np.ndarray) -> StepArrays:
    """The step that ``pack`` packed; its arrays are views of ``payload``."""
    t, s, r, width, scores = header[:5]
    flags = dict(zip(FLAGS, header[5 : 5 + len(FLAGS)], strict=True))
    out: dict = {}
    pos = 0
    for f, n in field_lengths(INT_FIELDS, t, s, r, width, scores):
        out[f.name], pos = payload[pos : pos + n], pos + n
    out["suppress"] = out["suppress"].reshape(r, MAX_SUPPRESS)
    out["block_tables"] = out["block_tables"].reshape(s, width)
    floats = payload[pos:].view(np.float32)
    for f, n in field_lengths(FLOAT_FIELDS, t, s, r, width, scores):
        out[f.name], floats = floats[:n], floats[n:]
    for name in ("any_sampling", "any_top_k_top_p", "any_min_p", "any_top_logprobs"):
        flags[name] = bool(flags[name])
    return StepArrays(**out, **flags)


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
        fields = header[1 : 7 + len(FLAGS)]  # 5 sizes, the flags, the payload length
        n = fields[-1]
        if n > len(self.buffer):
            self.buffer = torch.zeros(max(n, 2 * len(self.buffer)), dtype=torch.int64)
        view = self.buffer[:n]
        broadcast(self.group, view, self.src)
        return unpack(fields, view.numpy())
