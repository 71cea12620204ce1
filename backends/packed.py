"""Packed backend: pure torch, features kept as packed rows ``[N_visible, C]``.

Every per-site op (LayerNorm, the MLP, GELU, GRN, residual adds) and the strided convolutions cost
only the visible sites:

- ``patch_embed``: gathers the k x k pixel patch of every active output site, one matmul.
- ``strided_conv`` with k x k / stride k blocks (ConvNeXt's downsampling): gathers the k*k children
  rows of every active output site (a shared zero row stands in for missing children, so any
  sparsity pattern is exact) and does one matmul with the weight reshaped to ``[C_out, k*k*C_in]``.
- ``dwconv`` (stride 1, submanifold): the active sites are covered with halo tiles (the s x s blocks
  that hold an active site, plus k//2 of context), all tiles go through one depthwise ``conv2d``,
  and the weight gradient is a conv of the tiles with the output-gradient tiles as kernels (much
  faster on CPU than oneDNN's depthwise weight gradient). The tile size is chosen per stage from the
  sparsity (for a dense-ish map the tile is the whole map: a conv on a cached dense scratch buffer).
- ``conv`` (full channels, stride 1, submanifold): rows are written into a cached dense
  channels-last buffer whose inactive sites stay zero, a dense ``conv2d`` runs on it and the active
  rows are read back; backward is ``aten.convolution_backward`` on the same buffers.
- other ``strided_conv``s and ``max_pool`` (ResNet): RowBackend's gather of the k*k window rows of each
  given output site (a zero / -inf row for missing taps), then one matmul / a max; these window
  indices are built per call, not cached on the geometry (a few ops per network).
- ``sample_l2_norm``/``scale_samples`` (GRN, DropPath): per-sample reductions and broadcasts are views
  of ``[B, n, C]`` when all samples have the same number of visible sites (as mimsparse's maskers make
  them), a gather by sample index otherwise.

All index tensors of a stage (row <-> dense position, tile plans, children for downsampling, rows
per sample) are computed once per batch and stage and cached on :class:`PackedGeometry`, which every
tensor of that stage shares; nothing is cached in module globals. Scratch buffers are cached there
too and only ever written at active sites, so they need no per-layer zero fill. Rows are in
``SparseBatch`` order (batch, then raster), so ``to_sparse`` is free.

Static mode (``patch_embed(..., rows_per_sample=n, block=s)``: every sample has exactly n active
sites, made of whole s x s patches, as mimsparse's maskers make them): the indices are built without
host syncs or data-dependent shapes (a stable sort of each sample's mask instead of ``nonzero``, sizes
from ``n`` and ``s``, counts checked on the device by ``torch._assert_async``), and every op is
traceable torch, so ``torch.compile(fullgraph=True, dynamic=False)`` traces the whole train step and
replays it for any mask with that count. The depthwise conv, on CPU, uses halo tiles where whole
patches make tiles of a known number (8 x 8 at stride 4: n / 64 per sample) and the cost estimate
prefers them, else scatter -> dense channels-last conv -> gather (the only choice on a GPU, where
cuDNN's depthwise conv has not been measured against tiles yet); both with written-out backwards that
keep inductor's CPU code fast (on CPU the dense-map weight gradient is one conv over (channel, sample)
planes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mimsparse.sparse import SparseBatch

from .checks import check_conv_weight, check_strided_conv, is_block_conv
from .rows import RowBackend, scale_rows, sqrt_or_zero

# Depthwise tiles are processed in chunks of about this many input floats (a cache-sized working set
# for the weight-gradient convs); PackedBackend(tile_chunk_floats=...) overrides it.
TILE_CHUNK_FLOATS = 128 * 1024


# ------------------------------------------------------------------------------------------------
# geometry: the active sites of one stage, and everything derived from them
# ------------------------------------------------------------------------------------------------
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
        b = torch.div(flat, h * w, rounding_mode="floor")
        rem = flat - b * (h * w)
        y = torch.div(rem, w, rounding_mode="floor")
        x = rem - y * w
        coords = torch.stack([b, y, x], 1).to(torch.int32)
        counts = tuple(torch.bincount(b, minlength=batch_size).tolist()) if flat.numel() else (0,) * batch_size
        geom = cls(coords, flat, batch_size, (h, w), stride, counts)
        geom._cache["bxy"] = (b, y, x)
        return geom

    @classmethod
    def from_mask(cls, active_bhw: torch.Tensor, stride: int) -> "PackedGeometry":
        bsz, h, w = active_bhw.shape
        coords64 = active_bhw.nonzero()                        # sorted (batch, y, x)
        b, y, x = coords64.unbind(1)
        flat = (b * h + y) * w + x
        counts = tuple(torch.bincount(b, minlength=bsz).tolist()) if flat.numel() else (0,) * bsz
        geom = cls(coords64.to(torch.int32), flat, bsz, (h, w), stride, counts)
        geom._cache["bxy"] = (b, y, x)
        return geom

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
        b = torch.arange(bsz, device=act.device).repeat_interleave(n)
        rem = pos.reshape(-1)
        y = torch.div(rem, w, rounding_mode="floor")
        x = rem - y * w
        flat = b * (h * w) + rem
        geom = cls(torch.stack([b, y, x], 1).to(torch.int32), flat, bsz, (h, w), stride, (n,) * bsz, static=True,
                   block=max(1, int(block)))
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
        c = self.counts
        return c[0] if c and all(n == c[0] for n in c) else None

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
        if "d2r" not in self._cache:
            n = self.num_rows
            d2r = torch.full((self.num_sites,), n, dtype=torch.int64, device=self.device)
            d2r[self.flat] = torch.arange(n, device=self.device)
            self._cache["d2r"] = d2r
        return self._cache["d2r"]

    def active_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.num_sites, dtype=torch.bool, device=self.device)
        mask[self.flat] = True
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

    # ---- halo tiles for depthwise convs --------------------------------------------------------
    def tile_plan(self, sh: int, sw: int, kh: int, kw: int, channels: int,
                  chunk_floats: int = TILE_CHUNK_FLOATS) -> "TilePlan":
        key = ("plan", sh, sw, kh, kw, channels, chunk_floats)
        if key not in self._cache:
            self._cache[key] = TilePlan.build(self, sh, sw, kh, kw, channels, chunk_floats)
        return self._cache[key]

    def tiles(self, sh: int, sw: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The sh x sw blocks holding at least one active site: (block id of each row, rank of
        each block among the occupied ones (P where empty), P).

        A static geometry whose promised blocks (``block``) are whole sh x sw tiles knows P = rows /
        (sh*sw) on the host: no sync, the count checked on the device instead."""
        key = ("tiles", sh, sw)
        if key not in self._cache:
            h, w = self.spatial_shape
            if self.static and (self.block % sh or self.block % sw or h % sh or w % sw):
                raise ValueError(f"static halo tiles {sh}x{sw} need whole tiles: a {h}x{w} map of whole "
                                 f"{self.block}x{self.block} blocks has none")
            nty, ntx = -(-h // sh), -(-w // sw)
            b, y, x = self.bxy()
            tid = (b * nty + torch.div(y, sh, rounding_mode="floor")) * ntx + torch.div(x, sw, rounding_mode="floor")
            occupied = torch.zeros(self.batch_size * nty * ntx, dtype=torch.int64, device=self.device)
            occupied = occupied.index_fill(0, tid, 1)
            csum = occupied.cumsum(0)
            if self.static:
                p = self.num_rows // (sh * sw)
                torch._assert_async(csum[-1] == p, f"static packed geometry: the active sites are not whole {sh}x{sw} "
                                                   f"tiles; use masks aligned with the patches or num_visible=None")
            else:
                p = int(csum[-1]) if csum.numel() else 0
            rank = torch.where(occupied.bool(), csum - 1, p)
            self._cache[key] = (tid, rank, p)
        return self._cache[key]

    # ---- downsampling ---------------------------------------------------------------------------
    def down(self, k: int) -> tuple["PackedGeometry", torch.Tensor, torch.Tensor, bool, bool]:
        """Geometry after a k x k / stride k conv, plus
        child_idx int64 [M*k*k]: row of child (dy, dx) of output row m at m*k*k + dy*k + dx, or N;
        parent_idx int64 [N]: the inverse, the slot of each input row in child_idx, or M*k*k for a
        row that no output reads (cropped border);
        complete: every child exists (the forward gather needs no zero row);
        covered: every input row has a parent (the backward gather needs no zero row)."""
        key = ("down", k)
        if self.static and key not in self._cache:
            self._cache[key] = self._down_static(k)
        if key not in self._cache:
            h, w = self.spatial_shape
            ho, wo = h // k, w // k
            n = self.num_rows
            b, y, x = self.bxy()
            by, bx = torch.div(y, k, rounding_mode="floor"), torch.div(x, k, rounding_mode="floor")
            slot = (y - by * k) * k + (x - bx * k)
            valid = (by < ho) & (bx < wo)
            total = self.batch_size * ho * wo
            pflat = torch.where(valid, (b * ho + by) * wo + bx, torch.full_like(b, total))
            covered = bool(valid.all())
            mask = torch.zeros(total + 1, dtype=torch.bool, device=self.device)
            mask[pflat] = True
            out_flat = mask[:total].nonzero().squeeze(1)
            child = PackedGeometry.from_flat(out_flat, self.batch_size, (ho, wo), self.stride * k)
            m = child.num_rows
            kk = k * k
            o2r = torch.full((total + 1,), m, dtype=torch.int64, device=self.device)
            o2r[out_flat] = torch.arange(m, device=self.device)
            parent_idx = torch.where(valid, o2r[pflat] * kk + slot, torch.full_like(slot, m * kk))
            child_idx = torch.full((m * kk,), n, dtype=torch.int64, device=self.device)
            child_idx[parent_idx[valid]] = torch.arange(n, device=self.device)[valid]
            complete = int(valid.sum()) == m * kk
            self._cache[key] = (child, child_idx, parent_idx, complete, covered)
        return self._cache[key]


    def _down_static(self, k: int):
        """``down`` for a static geometry whose k x k blocks are all complete (patch-aligned masks:
        every stage sees whole patches), with sizes known on the host: n / k^2 outputs per sample.
        Anything else fails the device-side count check of the child geometry."""
        h, w = self.spatial_shape
        n = self.counts[0]
        if h % k or w % k or n % (k * k):
            raise ValueError(f"static packed geometry: a {k}x{k} downsample of a {h}x{w} map with {n} sites per "
                             f"sample needs whole {k}x{k} blocks; use masks aligned with the patches or "
                             f"num_visible=None")
        ho, wo = h // k, w // k
        b, y, x = self.bxy()
        pflat = (b * ho + torch.div(y, k, rounding_mode="floor")) * wo + torch.div(x, k, rounding_mode="floor")
        mask = torch.zeros(self.batch_size * ho * wo, dtype=torch.bool, device=self.device).index_fill(0, pflat, True)
        child = PackedGeometry.from_mask_static(mask.view(self.batch_size, ho, wo), self.stride * k, n // (k * k),
                                                self.block // k)
        cb, cy, cx = child.bxy()
        dy = torch.arange(k, device=self.device)
        pos = ((cb[:, None, None] * h + cy[:, None, None] * k + dy[None, :, None]) * w
               + cx[:, None, None] * k + dy[None, None, :])        # [M, k, k] parent positions
        child_idx = self.dense_to_row()[pos.reshape(-1)]
        return child, child_idx, None, True, True


@dataclass(eq=False)
class TilePlan:
    """Halo tiles for a stride-1 depthwise conv: the active sites are covered by the sh x sw blocks
    that hold at least one of them; each tile is that block plus a (kh//2, kw//2) halo read from the
    neighbours (zero where inactive or outside the map).

    Gather mode (tiles smaller than the map, halos overlap): the tile inputs are gathered from the
    rows (plus a zero row) and laid out in ``nchunk`` chunks of ``ch`` tiles as (chunk, y, x, tile,
    channel), i.e. a channels-last [nchunk, ch*C, th, tw] map whose channel blocks are the tiles: one
    depthwise conv2d with the kernel repeated ch times runs every tile; the weight gradient is, per
    chunk, a depthwise conv of the tile inputs with the output-gradient tiles as kernels.

    Scatter mode (one tile per sample: the whole map): the convs run on the geometry's dense scratch
    buffer with conv2d's own padding; the weight gradient is a single depthwise conv of the padded
    input planes, laid out (channel, tile, y, x), with the output-gradient planes as kernels.

    in_idx:  gather mode, int64 [nchunk*th*tw*ch], row read at each tile input position (N = zero).
    int_idx: gather mode, int64 [nchunk*sh*sw*ch], row at each tile interior position (N = none).
    out_idx: gather mode, int64 [N], position of each row among the interior positions.
    in_pos, int_pos: scatter mode, int64 [N], position of each row in the (tile, y, x) padded input
        and interior planes."""

    sh: int
    sw: int
    th: int
    tw: int
    ch: int
    nchunk: int
    in_idx: torch.Tensor | None = None
    int_idx: torch.Tensor | None = None
    out_idx: torch.Tensor | None = None
    in_pos: torch.Tensor | None = None
    int_pos: torch.Tensor | None = None
    _bufs: dict = field(default_factory=dict, repr=False)

    @property
    def scatter(self) -> bool:
        return self.in_pos is not None

    def _buffer(self, role: str, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Cached zero buffer; callers only ever write the positions of active rows into it, so the
        rest stays zero for the life of the plan."""
        key = (role, shape, like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = like.new_zeros(shape)
        return buf

    def prepare(self, rows: torch.Tensor) -> torch.Tensor:
        """What ``conv``/``weight_grad`` read from: the rows, plus a zero row in gather mode."""
        return rows if self.scatter else _pad_row(rows)

    def conv(self, src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, role: str,
             geom: "PackedGeometry") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Depthwise conv (weight [C, 1, kh, kw]) read back at the active rows; also returns the
        gathered tile inputs (gather mode) for the weight gradient to reuse."""
        c = src.shape[1]
        if self.scatter:
            kh, kw = weight.shape[-2:]
            y = F.conv2d(geom.scatter(src, role), weight, bias, padding=(kh // 2, kw // 2), groups=c)
            return geom.gather(y), None
        return _tiles_conv(src, weight, bias, self.in_idx, self.out_idx, (self.nchunk, self.th, self.tw, self.ch))

    def weight_grad(self, x_src: torch.Tensor, g_src: torch.Tensor, kh: int, kw: int,
                    x_tiles: torch.Tensor | None = None) -> torch.Tensor:
        """Per channel, the sum over active sites of grad(site) * input(site + offset): [C, 1, kh, kw].
        ``x_src``/``g_src`` as returned by ``prepare``; ``x_tiles`` what ``conv`` returned."""
        c = x_src.shape[1]
        if self.scatter:
            p = self.ch
            x = self._buffer("xT", x_src, (c, p * self.th * self.tw))
            x.index_copy_(1, self.in_pos, x_src.t())
            k = self._buffer("gT", g_src, (c, p * self.sh * self.sw))
            k.index_copy_(1, self.int_pos, g_src.t())
            return _per_plane_weight_grad(x, k, p, (self.th, self.tw), (self.sh, self.sw), (kh, kw))
        return _tiles_weight_grad(g_src, x_tiles, self.int_idx, (self.nchunk, self.sh, self.sw, self.ch), kh, kw)

    @classmethod
    def build(cls, g: "PackedGeometry", sh: int, sw: int, kh: int, kw: int, channels: int,
              chunk_floats: int = TILE_CHUNK_FLOATS) -> "TilePlan":
        h, w = g.spatial_shape
        ph, pw = kh // 2, kw // 2
        th, tw = sh + 2 * ph, sw + 2 * pw
        tid, rank, p = g.tiles(sh, sw)
        b, y, x = g.bxy()
        nty, ntx = -(-h // sh), -(-w // sw)
        t = rank[tid]                                           # tile of each row
        if nty == 1 and ntx == 1:
            # one tile per sample, nothing overlaps: rows are scattered to their tile positions
            in_pos = (t * th + y + ph) * tw + x + pw
            int_pos = (t * sh + y) * sw + x
            return cls(sh, sw, th, tw, p, 1, in_pos=in_pos, int_pos=int_pos)
        ly, lx = y - torch.div(y, sh, rounding_mode="floor") * sh, x - torch.div(x, sw, rounding_mode="floor") * sw
        n = g.num_rows
        dev = g.device
        # chunks of ~chunk_floats input floats (a cache-sized working set for the weight
        # gradient), all of the same size ch (the last one padded with empty tiles)
        ch = max(1, min(p, chunk_floats // max(1, th * tw * channels)))
        if p * th * tw * channels <= 4 * chunk_floats:
            ch = max(p, 1)   # small enough: one chunk, fewer calls
        nchunk = -(-p // ch) if p else 0
        ch = -(-p // nchunk) if p else 1
        chunk, local = torch.div(t, ch, rounding_mode="floor"), t % ch
        out_idx = ((chunk * sh + ly) * sw + lx) * ch + local    # layout (chunk, sy, sx, tile)
        int_idx = torch.full((nchunk * sh * sw * ch,), n, dtype=torch.int64, device=dev)
        int_idx = int_idx.index_copy(0, out_idx, torch.arange(n, device=dev))
        # input windows (halo included) of every tile, read from the dense row map; the occupied
        # tile ids in rank order, by a stable sort (no nonzero: sync-free for a static geometry)
        tiles = (rank >= p).to(torch.int32).argsort(stable=True)[:p]
        tb = torch.div(tiles, nty * ntx, rounding_mode="floor")
        rem = tiles - tb * (nty * ntx)
        t_y = torch.div(rem, ntx, rounding_mode="floor") * sh - ph
        t_x = (rem % ntx) * sw - pw
        yy = t_y[:, None] + torch.arange(th, device=dev)        # [P, th]
        xx = t_x[:, None] + torch.arange(tw, device=dev)        # [P, tw]
        valid = ((yy >= 0) & (yy < h))[:, :, None] & ((xx >= 0) & (xx < w))[:, None, :]
        pos = (tb[:, None, None] * h + yy.clamp(0, h - 1)[:, :, None]) * w + xx.clamp(0, w - 1)[:, None, :]
        rows = torch.where(valid, g.dense_to_row()[pos], n)     # [P, th, tw]
        if nchunk * ch > p:
            rows = torch.cat([rows, rows.new_full((nchunk * ch - p, th, tw), n)])
        in_idx = rows.view(nchunk, ch, th, tw).permute(0, 2, 3, 1).reshape(-1)
        return cls(sh, sw, th, tw, ch, nchunk, in_idx=in_idx, int_idx=int_idx, out_idx=out_idx)


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


# ------------------------------------------------------------------------------------------------
# autograd functions
# ------------------------------------------------------------------------------------------------
class _SubmConv(torch.autograd.Function):
    """Stride-1 k x k submanifold conv (any groups) through a dense channels-last scratch buffer."""

    @staticmethod
    def forward(ctx, feats, weight, bias, geom: PackedGeometry, groups: int):
        pad = [weight.shape[-2] // 2, weight.shape[-1] // 2]
        w = weight.to(feats.dtype)
        x = geom.scatter(feats, "x")
        y = F.conv2d(x, w, None, padding=pad, groups=groups)
        out = geom.gather(y)
        if bias is not None:
            out += bias.to(out.dtype)
        ctx.geom, ctx.groups, ctx.pad = geom, groups, pad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(feats, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        geom, groups, pad = ctx.geom, ctx.groups, ctx.pad
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        grad_feats = grad_w = grad_b = None
        grad_out = grad_out.to(feats.dtype).contiguous()
        if need_in or need_w:
            w = weight.to(feats.dtype)
            g = geom.scatter(grad_out, "g")
            if need_w:
                x = geom.scatter(feats, "x")
                gi, gw, _ = torch.ops.aten.convolution_backward(
                    g, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], groups, [need_in, True, False])
                grad_w = gw.to(weight.dtype)
            else:
                gi = F.conv_transpose2d(g, w, None, padding=pad, groups=groups)
            if need_in:
                grad_feats = geom.gather(gi)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        return grad_feats, grad_w, grad_b, None, None


# ---- static mode: plain differentiable torch (AOTAutograd derives the backward, inductor fuses) ----
def _conv_static(feats, weight, bias, geom: PackedGeometry, groups: int) -> torch.Tensor:
    """Stride-1 submanifold conv: rows -> zero [B, H, W, C] map (channels-last) -> dense conv -> rows."""
    x = _scatter_static(feats, geom.flat, (geom.batch_size, *geom.spatial_shape))
    pad = (weight.shape[-2] // 2, weight.shape[-1] // 2)
    return geom.gather(F.conv2d(x, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype),
                                padding=pad, groups=groups))


class _StaticDWConv(torch.autograd.Function):
    """Stride-1 submanifold depthwise conv for static mode: rows -> zero [B, H, W, C] map -> dense
    channels-last conv -> rows, with its backward written out (dynamo traces it, inductor fuses the
    scatters and gathers around the convs). Left to AOTAutograd, inductor on CPU turned the gather's
    backward into an atomic scatter-add and fed convolution_backward an NCHW gradient and an odd
    [B, H, C, W] input: the step's depthwise backward took 4-6x the eager time (BENCHMARKS.md). Here
    the gradient is scattered with index_copy (each row has one site), the input gradient is the
    same channels-last conv with the flipped kernel (input and output sites are equal), and only the
    weight gradient uses convolution_backward, on channels-last views."""

    @staticmethod
    def forward(ctx, feats, weight, bias, flat, dims: tuple[int, int, int]):
        c = feats.shape[1]
        pad = (weight.shape[-2] // 2, weight.shape[-1] // 2)
        x = _scatter_static(feats, flat, dims)
        y = F.conv2d(x, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype), padding=pad, groups=c)
        ctx.save_for_backward(feats, weight, flat)
        ctx.dims, ctx.pad, ctx.has_bias = dims, pad, bias is not None
        return _gather_static(y, flat)

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, flat = ctx.saved_tensors
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        c, w = feats.shape[1], weight.to(feats.dtype)
        grad_out = grad_out.to(feats.dtype)
        g = _scatter_static(grad_out, flat, ctx.dims)
        grad_feats = grad_w = grad_b = None
        if need_in:
            grad_feats = _gather_static(F.conv2d(g, w.flip(-2, -1), None, padding=ctx.pad, groups=c), flat)
        if need_w and feats.device.type == "cpu":
            grad_w = _planes_weight_grad(feats, grad_out, flat, ctx.dims, weight.shape[-2:]).to(weight.dtype)
        elif need_w:  # cuDNN has a real depthwise weight gradient; a 56x56 "kernel" per plane is untested there
            grad_w = torch.ops.aten.convolution_backward(
                g, _scatter_static(feats, flat, ctx.dims), w, None, [1, 1], list(ctx.pad), [1, 1], False, [0, 0],
                c, [False, True, False])[1].to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.float().sum(0).to(weight.dtype)
        return grad_feats, grad_w, grad_b, None, None


def _planes_weight_grad(feats, grad_out, flat, dims, kernel) -> torch.Tensor:
    """Depthwise weight gradient [C, 1, kh, kw] as one conv with B*C groups: each (channel, sample)
    plane of the zero-padded input, written (c, b, y, x) straight from the rows, convolved with that
    plane of the output gradient as its kernel, then summed over samples (TilePlan's scatter mode).
    On CPU 2-3x faster than oneDNN's depthwise weight gradient (convolution_backward) at
    28x28 and smaller maps, about equal at 56x56."""
    b, h, w = dims
    kh, kw = kernel
    ph, pw = kh // 2, kw // 2
    th, tw = h + 2 * ph, w + 2 * pw
    c = feats.shape[1]
    s = torch.div(flat, h * w, rounding_mode="floor")
    y = torch.div(flat - s * (h * w), w, rounding_mode="floor")
    x = flat - s * (h * w) - y * w
    in_pos = (s * th + y + ph) * tw + x + pw
    x_planes = feats.new_zeros(c, b * th * tw).index_copy(1, in_pos, feats.t())
    g_planes = feats.new_zeros(c, b * h * w).index_copy(1, flat, grad_out.t())
    return _per_plane_weight_grad(x_planes, g_planes, b, (th, tw), (h, w), kernel)


def _per_plane_weight_grad(x_planes, g_planes, planes: int, in_hw, out_hw, kernel) -> torch.Tensor:
    """x_planes [C, planes*th*tw] (zero-padded inputs), g_planes [C, planes*sh*sw] (output gradients)
    -> depthwise weight gradient [C, 1, kh, kw]: one conv with C*planes groups, each plane's output
    gradient the kernel of its input plane, summed over the planes."""
    c = x_planes.shape[0]
    r = F.conv2d(x_planes.view(1, c * planes, *in_hw), g_planes.view(c * planes, 1, *out_hw), None, groups=c * planes)
    return r.view(c, planes, *kernel).sum(1).unsqueeze(1)


def _scatter_static(rows, flat, dims) -> torch.Tensor:
    """rows [N, C] -> [B, C, H, W] (channels-last memory), zero where no row lands."""
    b, h, w = dims
    c = rows.shape[1]
    return rows.new_zeros(b * h * w, c).index_copy(0, flat, rows).view(b, h, w, c).permute(0, 3, 1, 2)


def _gather_static(dense_bchw, flat) -> torch.Tensor:
    """The rows at ``flat`` of a [B, C, H, W] map: a view of channels-last memory, one copy otherwise
    (reshape copies exactly when the NHWC permute is not contiguous)."""
    return dense_bchw.permute(0, 2, 3, 1).reshape(-1, dense_bchw.shape[1]).index_select(0, flat)


def _pad_row(rows: torch.Tensor) -> torch.Tensor:
    """rows with a zero row appended (index N reads zero)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


def _tiles_conv(src_padded, weight, bias, in_idx, out_idx, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather mode of TilePlan.conv: the tile inputs through one depthwise conv with the kernel repeated
    ch times; returns the rows at the interior positions and the tile inputs."""
    ch, c = layout[3], src_padded.shape[1]
    x = _tile_inputs(src_padded, in_idx, layout)
    y = F.conv2d(x, weight.repeat(ch, 1, 1, 1), None if bias is None else bias.repeat(ch), groups=ch * c)
    return y.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, out_idx), x


def _tile_inputs(src_padded, in_idx, layout) -> torch.Tensor:
    """The tile inputs [nchunk, ch*C, th, tw] (channels-last; the channel blocks are the tiles)."""
    nchunk, th, tw, ch = layout
    return src_padded.index_select(0, in_idx).view(nchunk, th, tw, ch * src_padded.shape[1]).permute(0, 3, 1, 2)


def _tiles_weight_grad(g_padded, x_tiles, int_idx, layout, kh: int, kw: int) -> torch.Tensor:
    """Gather mode of TilePlan.weight_grad: per chunk, a depthwise conv of the tile inputs with the
    output-gradient tiles as kernels, summed over chunks and tiles."""
    nchunk, sh, sw, ch = layout
    c = g_padded.shape[1]
    cc = ch * c
    kern = g_padded.index_select(0, int_idx).view(nchunk, sh * sw, cc).transpose(1, 2).contiguous()
    acc = None
    for i in range(nchunk):
        r = F.conv2d(x_tiles[i:i + 1], kern[i].view(cc, 1, sh, sw), None, groups=cc)
        acc = r if acc is None else acc.add_(r)
    if acc is None:
        return g_padded.new_zeros(c, 1, kh, kw)
    return acc.view(ch, c, kh, kw).sum(0).unsqueeze(1)


class _StaticTileDWConv(torch.autograd.Function):
    """Static mode's halo-tile depthwise conv (a static geometry's TilePlan): the gather-mode tile conv with
    its index tensors passed in, so dynamo traces it into the step's graph. Saves the rows, not the
    tile inputs (3x the rows at 8x8 tiles): the backward gathers them again."""

    @staticmethod
    def forward(ctx, feats, weight, bias, in_idx, int_idx, out_idx, layout):
        w = weight.to(feats.dtype)
        out, _ = _tiles_conv(_pad_row(feats), w, None if bias is None else bias.to(feats.dtype), in_idx, out_idx,
                             layout[:4])
        ctx.save_for_backward(feats, weight, in_idx, int_idx, out_idx)
        ctx.layout, ctx.has_bias = layout, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, in_idx, int_idx, out_idx = ctx.saved_tensors
        nchunk, th, tw, ch, sh, sw = ctx.layout
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(feats.dtype)
        g = _pad_row(grad_out.to(feats.dtype))
        grad_feats = grad_w = grad_b = None
        if need_in:
            grad_feats = _tiles_conv(g, w.flip(-2, -1), None, in_idx, out_idx, (nchunk, th, tw, ch))[0]
        if need_w:
            x_tiles = _tile_inputs(_pad_row(feats), in_idx, (nchunk, th, tw, ch))
            grad_w = _tiles_weight_grad(g, x_tiles, int_idx, (nchunk, sh, sw, ch), *weight.shape[-2:]).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.float().sum(0).to(weight.dtype)
        return grad_feats, grad_w, grad_b, None, None, None, None


class _TileDWConv(torch.autograd.Function):
    """Submanifold depthwise conv over halo tiles (see TilePlan). Backward: the input gradient is
    the same tiled conv of the output gradient with the flipped kernel (input and output active
    sets are equal); the weight gradient, per chunk, is a depthwise conv of the input tiles with the
    output-gradient tiles as kernel."""

    @staticmethod
    def forward(ctx, feats, weight, bias, plan: TilePlan, geom: PackedGeometry):
        ctx.geom = geom
        w = weight.to(feats.dtype)
        out, x_tiles = plan.conv(plan.prepare(feats), w, None if bias is None else bias.to(feats.dtype),
                                 "x", ctx.geom)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        # gather mode: keep the gathered tile inputs for the weight gradient (no second gather);
        # scatter mode: the rows, written again into the scratch buffer in backward
        ctx.save_for_backward(feats, weight, x_tiles)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        src, weight, x_tiles = ctx.saved_tensors
        plan = ctx.plan
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        grad_feats = grad_w = grad_b = None
        w = weight.to(src.dtype)
        g = plan.prepare(grad_out.to(src.dtype).contiguous())
        if need_in:
            grad_feats = plan.conv(g, w.flip(-2, -1), None, "g", ctx.geom)[0]
        if need_w:
            grad_w = plan.weight_grad(src, g, *weight.shape[-2:], x_tiles).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        return grad_feats, grad_w, grad_b, None, None


class _PermuteRows(torch.autograd.Function):
    """``out = src_padded[fwd_idx]`` where src_padded has a zero row appended at index N, and every
    source row is read at most once, so the gradient is again a gather:
    ``grad_src = grad_out_padded[bwd_idx]`` (bwd_idx = len(out) for rows nobody reads)."""

    @staticmethod
    def forward(ctx, src, fwd_idx, bwd_idx, fwd_pad: bool, bwd_pad: bool):
        ctx.save_for_backward(bwd_idx)
        ctx.bwd_pad = bwd_pad
        if fwd_pad:
            src = torch.cat([src, src.new_zeros(1, src.shape[1])])
        return src.index_select(0, fwd_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (bwd_idx,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.bwd_pad:
            grad_out = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
        return grad_out.index_select(0, bwd_idx), None, None, None, None


# ------------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------------
class PackedBackend(RowBackend):
    name = "packed"

    def __init__(self, dw_tiles="auto", tile_compute_weight: float = 1.0,
                 tile_chunk_floats: int = TILE_CHUNK_FLOATS):
        self.dw_tiles = dw_tiles
        self.tile_compute_weight = tile_compute_weight
        self.tile_chunk_floats = tile_chunk_floats

    # ---- entering and leaving -------------------------------------------------------------------
    def from_sparse(self, sb: SparseBatch) -> PackedTensor:
        sb.validate()
        h, w = sb.spatial_shape
        b, y, x = sb.coords.long().unbind(1)
        flat = (b * h + y) * w + x
        feats = sb.feats
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            order = flat.argsort()
            flat, feats = flat[order], feats[order]
            if bool((flat[1:] == flat[:-1]).any()):
                raise ValueError("duplicate coordinates: each active site must appear once")
        geom = PackedGeometry.from_flat(flat, sb.batch_size, (h, w), sb.stride)
        return PackedTensor(feats, geom)

    def to_sparse(self, t: PackedTensor) -> SparseBatch:
        g = t.geom
        return SparseBatch(g.coords, t.feats, g.batch_size, g.spatial_shape, g.stride)

    def from_dense(self, x_bchw, active_bhw, stride=1):
        if active_bhw.shape != (x_bchw.shape[0], *x_bchw.shape[2:]):
            raise ValueError(f"active mask {tuple(active_bhw.shape)} does not match the map {tuple(x_bchw.shape)}")
        geom = PackedGeometry.from_mask(active_bhw, stride)
        return PackedTensor(geom.gather(x_bchw), geom)

    def to_dense(self, t: PackedTensor) -> torch.Tensor:
        g = t.geom
        c = t.feats.shape[1]
        out = t.feats.new_zeros(g.num_sites, c).index_copy(0, g.flat, t.feats)
        return out.view(g.batch_size, *g.spatial_shape, c).permute(0, 3, 1, 2)

    def patch_embed(self, image, active_bhw, weight, bias, stride, rows_per_sample=None, block=1):
        """Gather the k x k pixel patch of every active output site, then one matmul (exact for any
        ``active_bhw``, aligned with the patches or not). ``rows_per_sample``: static mode (see the
        module docstring)."""
        k = weight.shape[-1]
        bsz, cin, h, w = image.shape
        ho, wo = h // k, w // k
        if active_bhw.shape != (bsz, ho, wo):
            raise ValueError(f"active mask {tuple(active_bhw.shape)} does not match the output grid {(bsz, ho, wo)}")
        geom = (PackedGeometry.from_mask(active_bhw, stride) if rows_per_sample is None
                else PackedGeometry.from_mask_static(active_bhw, stride, rows_per_sample, block))
        img = image[:, :, : ho * k, : wo * k].reshape(bsz, cin, ho, k, wo, k).permute(0, 2, 4, 1, 3, 5)
        patches = img.reshape(-1, cin * k * k).index_select(0, geom.flat).to(weight.dtype)
        return PackedTensor(F.linear(patches, weight.reshape(weight.shape[0], -1), bias), geom)

    # ---- convolutions ---------------------------------------------------------------------------
    def conv(self, t, weight, bias):
        kh, kw = check_conv_weight(weight, t.feats.shape[1], "conv")
        if kh == 1 and kw == 1:
            return t.replace(F.linear(t.feats, weight.flatten(1), bias))
        if t.geom.static:
            return t.replace(_conv_static(t.feats, weight, bias, t.geom, 1))
        return t.replace(_SubmConv.apply(t.feats, weight, bias, t.geom, 1))

    def dwconv(self, t, weight, bias):
        kh, kw = check_conv_weight(weight, t.feats.shape[1], "dwconv", depthwise=True)
        if kh == 1 and kw == 1:
            out = t.feats * weight.reshape(1, -1).to(t.feats.dtype)
            return t.replace(out + bias if bias is not None else out)
        if t.geom.static:
            tile = self.choose_tile_static(t.geom, kh, kw)
            if tile is None:
                dims = (t.geom.batch_size, *t.geom.spatial_shape)
                return t.replace(_StaticDWConv.apply(t.feats, weight, bias, t.geom.flat, dims))
            plan = t.geom.tile_plan(*tile, kh, kw, t.feats.shape[1], self.tile_chunk_floats)
            layout = (plan.nchunk, plan.th, plan.tw, plan.ch, plan.sh, plan.sw)
            return t.replace(_StaticTileDWConv.apply(t.feats, weight, bias, plan.in_idx, plan.int_idx, plan.out_idx,
                                                     layout))
        tile = self.choose_tile(t.geom, kh, kw)
        if tile is None:
            return t.replace(_SubmConv.apply(t.feats, weight, bias, t.geom, t.feats.shape[1]))
        plan = t.geom.tile_plan(*tile, kh, kw, t.feats.shape[1], self.tile_chunk_floats)
        return t.replace(_TileDWConv.apply(t.feats, weight, bias, plan, t.geom))

    def _tile_cost(self, sh: int, sw: int, kh: int, kw: int, tiles: int) -> float:
        """Tile input area (halo included: memory traffic, which dominates on CPU) + weight x interior
        area (compute), over all tiles."""
        return tiles * ((sh + kh - 1) * (sw + kw - 1) + self.tile_compute_weight * sh * sw)

    def choose_tile_static(self, geom: PackedGeometry, kh: int, kw: int) -> tuple[int, int] | None:
        """Static mode's depthwise tile: s x s tiles that are whole blocks of the geometry (``block``, the
        mask's patches at this stride, a multiple of s), so their number is known without a sync; taken
        when cheaper than the whole map by ``choose_tile``'s cost. None: the dense map (_StaticDWConv)."""
        if self.dw_tiles is None:
            return None
        h, w = geom.spatial_shape
        whole = lambda s: s < max(h, w) and geom.block % s == 0 and h % s == 0 and w % s == 0  # noqa: E731
        if self.dw_tiles != "auto":  # forced: that size when its tiles are whole, else the dense map
            sh, sw = self.dw_tiles
            return (sh, sw) if sh == sw and whole(sh) else None
        if geom.device.type != "cpu":  # the cost model and the win are measured on CPU only; on a GPU
            return None                # the dense map (cuDNN's depthwise conv) until the GPU check says
        best, best_cost = None, self._tile_cost(h, w, kh, kw, geom.batch_size)
        for s in (4, 8):
            if whole(s):
                c = self._tile_cost(s, s, kh, kw, geom.num_rows // (s * s))
                if c < best_cost:
                    best, best_cost = (s, s), c
        return best

    def choose_tile(self, geom: PackedGeometry, kh: int, kw: int) -> tuple[int, int] | None:
        """Tile size for depthwise convs (None: the dense scratch-buffer path).

        ``dw_tiles="auto"`` takes the candidate (4, 8, 16 or the whole map) with the least estimated
        cost: over all occupied tiles, tile input area (halo included: memory traffic, which
        dominates on CPU) + ``tile_compute_weight`` x interior area (compute). A (sh, sw) pair forces
        that tile size, None forces the dense path."""
        if self.dw_tiles != "auto":
            return self.dw_tiles
        if geom.num_rows == 0:
            return None
        key = ("tile_choice", kh, kw)
        if key not in geom._cache:
            h, w = geom.spatial_shape

            def cost(sh, sw, p):
                return self._tile_cost(sh, sw, kh, kw, p)

            # the whole map: one tile per sample that has any site (no tensor work to count them)
            best, best_cost = (h, w), cost(h, w, sum(1 for n in geom.counts if n))
            for s in (4, 8):  # larger tiles never won in measurements (halo area grows too fast)
                if s < max(h, w):
                    c = cost(s, s, geom.tiles(s, s)[2])
                    if c < best_cost:
                        best, best_cost = (s, s), c
            geom._cache[key] = best
        return geom._cache[key]

    def strided_conv(self, t, weight, bias, stride, *, padding, active_out_bhw=None):
        k, _ = check_strided_conv(weight, t.feats.shape[1], stride, padding, t.batch_size, t.spatial_shape,
                                  active_out_bhw)
        if not is_block_conv(k, stride, padding, active_out_bhw):
            return super().strided_conv(t, weight, bias, stride, padding=padding, active_out_bhw=active_out_bhw)
        # non-overlapping blocks: gather each output's k*k children rows (cached per geometry), one matmul
        child, child_idx, parent_idx, complete, covered = t.geom.down(k)
        if t.geom.static:  # every child exists: a plain gather, whose backward autograd derives
            gathered = t.feats.index_select(0, child_idx)
        else:
            gathered = _PermuteRows.apply(t.feats, child_idx, parent_idx, not complete, not covered)
        cout = weight.shape[0]
        wmat = weight.permute(0, 2, 3, 1).reshape(cout, -1)
        out = F.linear(gathered.view(child.num_rows, wmat.shape[1]), wmat, bias)
        return PackedTensor(out, child)

    # ---- per-site and per-sample ops ------------------------------------------------------------
    def feats(self, t):
        return t.feats

    def batch_index(self, t):
        return t.geom.batch_index()

    def batch_size(self, t):
        return t.geom.batch_size

    def with_feats(self, t, feats):
        return t.replace(feats)

    def map_feats(self, t, fn):
        return t.replace(fn(t.feats))

    def sample_l2_norm(self, t):
        n = t.geom.uniform
        if n is None:
            return super().sample_l2_norm(t)
        # every sample has n rows (always in static mode): a view of [B, n, C], no index_add
        f = t.feats
        return sqrt_or_zero(f.view(t.geom.batch_size, n, f.shape[1]).float().square().sum(1))

    def add(self, a, b):
        if a.feats.shape != b.feats.shape:
            raise ValueError(f"add needs the same active sites, got {tuple(a.feats.shape)} and {tuple(b.feats.shape)}")
        return a.replace(a.feats + b.feats)

    def scale_samples(self, t, scale, shift=None):
        n = t.geom.uniform
        if n is None:
            return super().scale_samples(t, scale, shift)
        f = t.feats
        bsz = t.geom.batch_size
        out = scale_rows(f.view(bsz, n, f.shape[1]), scale.view(bsz, 1, -1), shift)  # broadcast, no gather
        return t.replace(out.view_as(f))
