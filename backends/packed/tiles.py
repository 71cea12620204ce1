"""Halo tiles for stride-1 depthwise convs: which s x s blocks hold active sites (``occupied_tiles``),
the plan that lays their inputs out for one grouped conv (``TilePlan``), the conv and weight-gradient
kernels over those tiles, and the cost model that picks the tile size per stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .scatter import _pad_row, window_rows

if TYPE_CHECKING:
    from .geometry import PackedGeometry

# Depthwise tiles are processed in chunks of about this many input floats (a cache-sized working set
# for the weight-gradient convs); PackedBackend(tile_chunk_floats=...) overrides it.
TILE_CHUNK_FLOATS = 128 * 1024


def occupied_tiles(g: "PackedGeometry", sh: int, sw: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``PackedGeometry.tiles`` (which caches it)."""
    h, w = g.spatial_shape
    if g.static and (g.block % sh or g.block % sw or h % sh or w % sw):
        raise ValueError(f"static halo tiles {sh}x{sw} need whole tiles: a {h}x{w} map of whole "
                         f"{g.block}x{g.block} blocks has none")
    nty, ntx = -(-h // sh), -(-w // sw)
    b, y, x = g.bxy()
    tid = (b * nty + torch.div(y, sh, rounding_mode="floor")) * ntx + torch.div(x, sw, rounding_mode="floor")
    occupied = torch.zeros(g.batch_size * nty * ntx, dtype=torch.int64, device=g.device)
    occupied = occupied.index_fill(0, tid, 1)
    csum = occupied.cumsum(0)
    if g.static:
        p = g.num_rows // (sh * sw)
        torch._assert_async(csum[-1] == p, f"static packed geometry: the active sites are not whole {sh}x{sw} "
                                           f"tiles; use masks aligned with the patches or num_visible=None")
    else:
        p = int(csum[-1]) if csum.numel() else 0
    rank = torch.where(occupied.bool(), csum - 1, p)
    return tid, rank, p


def occupied_tile_origins(g: "PackedGeometry", sh: int, sw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, top y, left x) of the occupied sh x sw tiles of ``g``, in rank order (``g.tiles``), by a
    stable sort instead of ``nonzero`` (sync-free for a static geometry)."""
    h, w = g.spatial_shape
    _, rank, p = g.tiles(sh, sw)
    nty, ntx = -(-h // sh), -(-w // sw)
    tiles = (rank >= p).to(torch.int32).argsort(stable=True)[:p]
    tb = torch.div(tiles, nty * ntx, rounding_mode="floor")
    rem = tiles - tb * (nty * ntx)
    return tb, torch.div(rem, ntx, rounding_mode="floor") * sh, (rem % ntx) * sw


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
        # input windows (halo included) of every tile, read from the dense row map
        tb, ty, tx = occupied_tile_origins(g, sh, sw)
        rows = window_rows(g.dense_to_row(), (h, w), n, tb, ty - ph, tx - pw, th, tw)  # [P, th, tw]
        if nchunk * ch > p:
            rows = torch.cat([rows, rows.new_full((nchunk * ch - p, th, tw), n)])
        in_idx = rows.view(nchunk, ch, th, tw).permute(0, 2, 3, 1).reshape(-1)
        return cls(sh, sw, th, tw, ch, nchunk, in_idx=in_idx, int_idx=int_idx, out_idx=out_idx)



def _per_plane_weight_grad(x_planes, g_planes, planes: int, in_hw, out_hw, kernel) -> torch.Tensor:
    """x_planes [C, planes*th*tw] (zero-padded inputs), g_planes [C, planes*sh*sw] (output gradients)
    -> depthwise weight gradient [C, 1, kh, kw]: one conv with C*planes groups, each plane's output
    gradient the kernel of its input plane, summed over the planes."""
    c = x_planes.shape[0]
    r = F.conv2d(x_planes.view(1, c * planes, *in_hw), g_planes.view(c * planes, 1, *out_hw), None, groups=c * planes)
    return r.view(c, planes, *kernel).sum(1).unsqueeze(1)



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


def tile_cost(sh: int, sw: int, kh: int, kw: int, tiles: int, compute_weight: float) -> float:
    """Tile input area (halo included: memory traffic, which dominates on CPU) + weight x interior
    area (compute), over all tiles."""
    return tiles * ((sh + kh - 1) * (sw + kw - 1) + compute_weight * sh * sw)


def choose_tile_static(geom: "PackedGeometry", kh: int, kw: int, dw_tiles, compute_weight: float) -> tuple[int, int] | None:
    """Static mode's depthwise tile: s x s tiles that are whole blocks of the geometry (``block``, the
    mask's patches at this stride, a multiple of s), so their number is known without a sync; taken
    when cheaper than the whole map by ``choose_tile``'s cost. None: the dense map (_StaticDWConv)."""
    if dw_tiles is None:
        return None
    h, w = geom.spatial_shape
    whole = lambda s: s < max(h, w) and geom.block % s == 0 and h % s == 0 and w % s == 0  # noqa: E731
    if dw_tiles != "auto":  # forced: that size when its tiles are whole, else the dense map
        sh, sw = dw_tiles
        return (sh, sw) if sh == sw and whole(sh) else None
    if geom.device.type != "cpu":  # the cost model and the win are measured on CPU only; on a GPU
        return None                # the dense map (cuDNN's depthwise conv) until the GPU check says
    best, best_cost = None, tile_cost(h, w, kh, kw, geom.batch_size, compute_weight)
    for s in (4, 8):
        if whole(s):
            c = tile_cost(s, s, kh, kw, geom.num_rows // (s * s), compute_weight)
            if c < best_cost:
                best, best_cost = (s, s), c
    return best

def choose_tile(geom: "PackedGeometry", kh: int, kw: int, dw_tiles, compute_weight: float) -> tuple[int, int] | None:
    """Tile size for depthwise convs (None: the dense scratch-buffer path).

    ``dw_tiles="auto"`` takes the candidate (4, 8, 16 or the whole map) with the least estimated
    cost: over all occupied tiles, tile input area (halo included: memory traffic, which
    dominates on CPU) + ``compute_weight`` x interior area (compute). A (sh, sw) pair forces
    that tile size, None forces the dense path."""
    if dw_tiles != "auto":
        return dw_tiles
    if geom.num_rows == 0:
        return None
    key = ("tile_choice", kh, kw)
    if key not in geom._cache:
        h, w = geom.spatial_shape

        def cost(sh, sw, p):
            return tile_cost(sh, sw, kh, kw, p, compute_weight)

        # the whole map: one tile per sample that has any site (no tensor work to count them)
        best, best_cost = (h, w), cost(h, w, sum(1 for n in geom.counts if n))
        for s in (4, 8):  # larger tiles never won in measurements (halo area grows too fast)
            if s < max(h, w):
                c = cost(s, s, geom.tiles(s, s)[2])
                if c < best_cost:
                    best, best_cost = (s, s), c
        geom._cache[key] = best
    return geom._cache[key]
