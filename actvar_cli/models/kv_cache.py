"""The keys and values each block has seen so far, preallocated once per generation.

With a ``capacity`` (every token the generation will cache, known from the policy) each block's
buffer is allocated at the first scale and each scale writes its slice: no ``torch.cat`` per scale,
and every step has the same shapes every time (what CUDA graphs need). Without one it grows.

With ``bits=8`` the cache keeps int8 keys and values with one scale per (row, head, token), a quarter
of float32 (half of bf16): attention reads them dequantized, one block at a time, so the whole float
cache never exists at once. It is the ``kv-int8`` part of a stack.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One block's keys and values: views (B, H, L_cached, head_dim)."""

    def __init__(self, capacity: int | None = None, bits: int = 0) -> None:
        if bits not in (0, 8):
            raise ValueError(f"a KV cache of {bits} bits: only 8 (int8) or 0 (as computed)")
        if bits and capacity is None:
            raise ValueError("an int8 KV cache is preallocated: give its capacity")
        self.capacity, self.bits = capacity, bits
        self.length = 0
        self._k: torch.Tensor | None = None  # B, H, capacity, c (int8 with bits=8)
        self._v: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None  # 2, B, H, capacity, 1 (bits=8)
        self._dtype = torch.float32  # what attention reads

    @property
    def k(self) -> torch.Tensor | None:
        return self._read(self._k, 0)

    @property
    def v(self) -> torch.Tensor | None:
        return self._read(self._v, 1)

    def _read(self, buf: torch.Tensor | None, which: int) -> torch.Tensor | None:
        if buf is None:
            return None
        part = buf[:, :, : self.length]
        if not self.bits:
            return part
        return (part.to(torch.float32) * self._scales[which, :, :, : self.length]).to(self._dtype)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.capacity is None and not self.bits:
            self._k = k if self._k is None else torch.cat((self.k, k), dim=2)
            self._v = v if self._v is None else torch.cat((self.v, v), dim=2)
        else:
            if self._k is None:
                self._allocate(k)
            end = self.length + n
            if end > self._k.shape[2]:
                raise ValueError(f"the KV cache holds {self._k.shape[2]} tokens, and {end} were given")
            for which, (buf, new) in enumerate(((self._k, k), (self._v, v))):
                if self.bits:
                    new = new.float()
                    scale = new.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127  # B, H, n, 1
                    self._scales[which, :, :, self.length : end] = scale
                    new = (new / scale).round().clamp(-127, 127)
                buf[:, :, self.length : end] = new
        self.length += n
        return self.k, self.v

    def _allocate(self, k: torch.Tensor) -> None:
        B, H, _, c = k.shape
        dtype = torch.int8 if self.bits else k.dtype
        self._dtype = k.dtype
        self._k = k.new_empty(B, H, self.capacity, c, dtype=dtype)
        self._v = k.new_empty(B, H, self.capacity, c, dtype=dtype)
        if self.bits:
            self._scales = k.new_empty(2, B, H, self.capacity, 1, dtype=torch.float32)

    def keep_rows(self, rows: int) -> None:
        """Guidance turned off: only the first ``rows`` (the conditional ones) go on; a view, no copy."""
        if self._k is not None:
            self._k, self._v = self._k[:rows], self._v[:rows]
            if self._scales is not None:
                self._scales = self._scales[:, :rows]
