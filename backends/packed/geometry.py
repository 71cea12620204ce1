"""The active sites of one stage (``PackedGeometry``) and the packed tensor (rows + geometry).

A geometry is built once per batch and stage, from a mask (``nonzero``, one host sync for the
per-sample counts) or, in static mode, from a mask with a promised number of sites per sample (a
stable sort, no sync). Everything derived from the sites is cached on it: row <-> dense position,
the halo-tile plans (tiles.py), the children of a downsampling (blocks.py), dense scratch buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blocks import block_children, block_children_static
from .scatter import _gather_static
from .tiles import TILE_CHUNK_FLOATS, TilePlan, occupied_tiles


@dataclass(eq=False)
class PackedGeometry:
    """Active sites of a batch at one stride. Immutable; derived index tensors are cached lazily.

    coords: int32 [N, 3] (batch, y, x) sorted by batch then raster order.
    flat:   int64 [N], ``(b * H + y) * W + x``, strictly increasing.
    counts: rows per sample (Python ints; one host sync when the geometry is built).
    """

    coords: torch.Tensor
    flat: torch.Tensor
    batch_size: int
    spatial_shape: tuple[int, int]
    stride: int
    counts: tuple[int, ...]
    static: bool = False            # built by from_mask_static: sync-free, static shapes
    block: int = 1                  # static: the active sites are whole block x block squares on that grid
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, flat: torch.Tensor, batch_size: int, spatial_shape, stride: int) -> "PackedGeometry":
        """``flat`` must be sorted and unique."""
        h, w = int(spatial_shape[0]), int(spatial_shape[1])
        flat = flat.to(torch.int64)
        b, y, x = _unflatten(flat, h, w)
        counts = tuple(torch.bincount(b, minlength=batch_size).tolist()) if flat.numel() else (0,) * batch_size
        return cls._with_bxy(b, y, x, flat, batch_size, (h, w), stride, counts)

    @classmethod
    def from_mask(cls, active_bhw: torch.Tensor, stride: int) -> "PackedGeometry":
        bsz, h, w = active_bhw.shape
        coords64 = active_bhw.nonzero()                        # sorted (batch, y, x)
        b, y, x = coords64.unbind(1)
        flat = (b * h + y) * w + x
        counts = tuple(torch.bincount(b, minlength=bsz).tolist()) if flat.numel() else (0,) * bsz
        return cls._with_bxy(b, y, x, flat, bsz, (h, w), stride, counts)

    @classmethod
    def from_mask_static(cls, active_bhw: torch.Tensor, stride: int, rows_per_sample: int,
                         block: int = 1) -> "PackedGeometry":
        """Like ``from_mask`` when every sample has exactly ``rows_per_sample`` active sites, without a
        host sync: a stable sort of each sample's inactive flags puts its active sites first, in raster
        order, so the first ``rows_per_sample`` positions are its rows. The count is checked on the device
        (an error at the next sync, e.g. ``loss.item()``, not a silent wrong result). ``block``: the
        caller's promise that the active sites form whole block x block squares of the block grid (the
        mask's patches at this stride); ops that rely on it check it on the device too."""
        bsz, h, w = active_bhw.shape
        n = int(rows_per_sample)
        if not 0 < n <= h * w:
            raise ValueError(f"rows_per_sample={n} must be in [1, {h * w}] (sites per sample at stride {stride})")
        act = active_bhw.reshape(bsz, h * w)
        torch._assert_async((act.sum(1) == n).all(),
                            f"static packed geometry: every sample must have exactly {n} active sites at stride "
                            f"{stride}; pass num_visible=None for masks with varying counts")
        pos = (~act).to(torch.int32).argsort(dim=1, stable=True)[:, :n]
        flat = torch.arange(bsz, device=act.device).repeat_interleave(n) * (h * w) + pos.reshape(-1)
        return cls._with_bxy(*_unflatten(flat, h, w), flat, bsz, (h, w), stride, (n,) * bsz, static=True,
                             block=max(1, int(block)))

    @classmethod
    def _with_bxy(cls, b, y, x, flat, *args, **kwargs) -> "PackedGeometry":
        geom = cls(torch.stack([b, y, x], 1).to(torch.int32), flat, *args, **kwargs)
        geom._cache["bxy"] = (b, y, x)
        return geom

    # ---- simple properties ----------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.flat.shape[0]

    @property
    def num_sites(self) -> int:
        return self.batch_size * self.spatial_shape[0] * self.spatial_shape[1]

    @property
    def uniform(self) -> int | None:
        """Rows per sample when every sample has the same number (random_patch_mask does), else None."""
        return self.counts[0] if self.counts and len(set(self.counts)) == 1 else None

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def bxy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int64 (batch, y, x) of every row."""
        if "bxy" not in self._cache:
            self._cache["bxy"] = tuple(self.coords.long().unbind(1))
        return self._cache["bxy"]

    def batch_index(self) -> torch.Tensor:
        return self.bxy()[0]

    def dense_to_row(self) -> torch.Tensor:
        """int64 [B*H*W]: row of each dense position, ``N`` where inactive."""
        n, dev = self.num_rows, self.device
        return self.cached("d2r", lambda: torch.full((self.num_sites,), n, dtype=torch.int64, device=dev).index_copy(
            0, self.flat, torch.arange(n, device=dev)))

    def active_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.num_sites, dtype=torch.bool, device=self.device).index_fill(0, self.flat, True)
        return mask.view(self.batch_size, *self.spatial_shape)

    # ---- dense scratch buffers ------------------------------------------------------------------
    def scatter(self, rows: torch.Tensor, role: str) -> torch.Tensor:
        """Write ``rows`` [N, C] into a cached [B, H, W, C] buffer that is zero at inactive sites and
        return it as an NCHW (channels-last strided) view. Inactive sites are never written, so the
        buffer is zero-filled once per (stage, channels, dtype, role), not once per layer.
        The buffer is overwritten by the next call with the same key: use the result right away."""
        c = rows.shape[1]
        key = ("buf", role, c, rows.dtype, rows.device)
        buf = self._cache.get(key)
        if buf is None:
            buf = rows.new_zeros(self.batch_size, *self.spatial_shape, c)
            self._cache[key] = buf
        buf.view(-1, c).index_copy_(0, self.flat, rows)
        return buf.permute(0, 3, 1, 2)

    def gather(self, dense_bchw: torch.Tensor) -> torch.Tensor:
        """Rows [N, C] of a dense map at the active sites."""
        return _gather_static(dense_bchw, self.flat)

    # ---- derived indices: halo tiles (depthwise convs), children (downsampling) -----------------
    def cached(self, key, build):
        """``build()``, computed once per geometry and key."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def tile_plan(self, sh: int, sw: int, kh: int, kw: int, channels: int,
                  chunk_floats: int = TILE_CHUNK_FLOATS) -> "TilePlan":
        return self.cached(("plan", sh, sw, kh, kw, channels, chunk_floats),
                           lambda: TilePlan.build(self, sh, sw, kh, kw, channels, chunk_floats))

    def tiles(self, sh: int, sw: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The sh x sw blocks holding at least one active site: (block id of each row, rank of
        each block among the occupied ones (P where empty), P).

        A static geometry whose promised blocks (``block``) are whole sh x sw tiles knows P = rows /
        (sh*sw) on the host: no sync, the count checked on the device instead."""
        return self.cached(("tiles", sh, sw), lambda: occupied_tiles(self, sh, sw))
    def down(self, k: int) -> tuple["PackedGeometry", torch.Tensor, torch.Tensor, bool, bool]:
        """Geometry after a k x k / stride k conv, plus
        child_idx int64 [M*k*k]: row of child (dy, dx) of output row m at m*k*k + dy*k + dx, or N;
        parent_idx int64 [N]: the inverse, the slot of each input row in child_idx, or M*k*k for a
        row that no output reads (cropped border);
        complete: every child exists (the forward gather needs no zero row);
        covered: every input row has a parent (the backward gather needs no zero row)."""
        return self.cached(("down", k), lambda: (block_children_static if self.static else block_children)(self, k))


def _unflatten(flat: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 (batch, y, x) of flat positions ``(b * h + y) * w + x``."""
    b = torch.div(flat, h * w, rounding_mode="floor")
    rem = flat - b * (h * w)
    y = torch.div(rem, w, rounding_mode="floor")
    return b, y, rem - y * w


@dataclass(eq=False)
class PackedTensor:
    """The packed backend's native tensor: feature rows in SparseBatch order + their geometry."""

    feats: torch.Tensor
    geom: PackedGeometry

    @property
    def coords(self) -> torch.Tensor:
        return self.geom.coords

    @property
    def batch_size(self) -> int:
        return self.geom.batch_size

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return self.geom.spatial_shape

    @property
    def stride(self) -> int:
        return self.geom.stride

    def replace(self, feats: torch.Tensor) -> "PackedTensor":
        return PackedTensor(feats, self.geom)
