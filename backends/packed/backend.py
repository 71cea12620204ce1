"""The packed backend: the ``Backend`` interface over ``PackedTensor`` (rows + geometry), dispatching each
op to the geometry's cached indices and the autograd functions of subm_conv.py, dwconv.py and permute.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimsparse.sparse import SparseBatch

from ..checks import check_conv_weight, check_strided_conv, check_window_op, is_block_conv
from ..rows import RowBackend, scale_rows, sqrt_or_zero, window_max
from .blocks import block_conv
from .dwconv import depthwise
from .gather_conv import gather_conv
from .geometry import PackedGeometry, PackedTensor
from .subm_conv import dense_map_conv
from .tile_conv import choose_conv_tile, conv_tile_index, tile_conv, tile_max_pool
from .tiles import TILE_CHUNK_FLOATS, choose_tile, choose_tile_static
from .windows import output_geometry, windows

# k x k convs gather their windows (gather_conv.py) up to this fraction of active sites and run on the dense
# map above it: the measured break-even of ResNet-50's stage-1 3x3 (64 channels) on CPU (BENCHMARKS.md).
GATHER_MAX_DENSITY = 0.5


class PackedBackend(RowBackend):
    name = "packed"

    def __init__(self, dw_tiles="auto", tile_compute_weight: float = 1.0,
                 tile_chunk_floats: int = TILE_CHUNK_FLOATS, conv_impl: str = "auto"):
        if conv_impl not in ("auto", "tiles", "gather", "dense"):
            raise ValueError(f"conv_impl must be auto, tiles, gather or dense, got {conv_impl!r}")
        # k x k convs: "tiles" (halo tiles where the blocks allow, else the gather), "gather" (sparse
        # cost), "dense" (dense map; strided convs at given sites then gather), "auto" (conv_plan)
        self.conv_impl = conv_impl
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

    def from_dense(self, x_bchw, active_bhw, stride=1, rows_per_sample=None, block=1):
        if active_bhw.shape != (x_bchw.shape[0], *x_bchw.shape[2:]):
            raise ValueError(f"active mask {tuple(active_bhw.shape)} does not match the map {tuple(x_bchw.shape)}")
        geom = (PackedGeometry.from_mask(active_bhw, stride) if rows_per_sample is None
                else PackedGeometry.from_mask_static(active_bhw, stride, rows_per_sample, block))
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
        impl, s = self.conv_plan(t.geom, t.geom, kh, 1) if kh == kw else ("dense", None)
        if impl == "tiles":
            return t.replace(tile_conv(t.feats, weight, bias, conv_tile_index(t.geom, t.geom, s, kh, 1, kh // 2), 1))
        if impl == "gather":
            return t.replace(gather_conv(t.feats, weight, bias, *windows(t.geom, t.geom, kh, 1, kh // 2, t.feats.requires_grad)))
        return t.replace(dense_map_conv(t.feats, weight, bias, t.geom))

    def conv_plan(self, g_in: PackedGeometry, g_out: PackedGeometry, k: int, stride: int) -> tuple[str, int | None]:
        """How a k x k conv from ``g_in`` to ``g_out`` runs: ("tiles", block size), ("gather", None) or
        ("dense", None; stride 1 only). Auto: on CPU halo tiles where the output blocks allow
        (tile_conv.choose_conv_tile), else the gather-GEMM up to GATHER_MAX_DENSITY, else the dense map;
        on a GPU (unmeasured) the dense map (cuDNN), the gather for strided convs at given sites. A strided
        1x1 conv always gathers (its window is one row)."""
        impl = "gather" if k == 1 else self.conv_impl
        if impl == "auto":
            if g_in.device.type != "cpu":
                impl = "dense"
            else:
                s = choose_conv_tile(g_out, stride)
                if s is not None:
                    return "tiles", s
                impl = "gather" if stride > 1 or g_in.num_rows <= GATHER_MAX_DENSITY * g_in.num_sites else "dense"
        if impl == "tiles":
            s = choose_conv_tile(g_out, stride, min_side=2)
            return ("tiles", s) if s is not None else ("gather", None)
        return ("gather", None) if impl == "dense" and stride > 1 else (impl, None)

    def dwconv(self, t, weight, bias):
        kh, kw = check_conv_weight(weight, t.feats.shape[1], "dwconv", depthwise=True)
        if kh == 1 and kw == 1:
            out = t.feats * weight.reshape(1, -1).to(t.feats.dtype)
            return t.replace(out + bias if bias is not None else out)
        tile = self.choose_tile_static(t.geom, kh, kw) if t.geom.static else self.choose_tile(t.geom, kh, kw)
        return t.replace(depthwise(t.feats, weight, bias, t.geom, tile, self.tile_chunk_floats))

    def choose_tile_static(self, geom: PackedGeometry, kh: int, kw: int) -> tuple[int, int] | None:
        """Static mode's depthwise tile (tiles.choose_tile_static); None: the dense map (_StaticDWConv)."""
        return choose_tile_static(geom, kh, kw, self.dw_tiles, self.tile_compute_weight)

    def choose_tile(self, geom: PackedGeometry, kh: int, kw: int) -> tuple[int, int] | None:
        """Tile size for depthwise convs (tiles.choose_tile); None: the dense scratch-buffer path."""
        return choose_tile(geom, kh, kw, self.dw_tiles, self.tile_compute_weight)

    def strided_conv(self, t, weight, bias, stride, *, padding, active_out_bhw=None):
        k, _ = check_strided_conv(weight, t.feats.shape[1], stride, padding, t.batch_size, t.spatial_shape,
                                  active_out_bhw)
        if active_out_bhw is not None:  # the given sites (ResNet): halo tiles or gather-GEMM (conv_plan)
            out = output_geometry(t.geom, stride, active_out_bhw)
            impl, s = self.conv_plan(t.geom, out, k, stride)
            if impl == "tiles":
                return PackedTensor(tile_conv(t.feats, weight, bias, conv_tile_index(t.geom, out, s, k, stride, padding),
                                              stride), out)
            return PackedTensor(gather_conv(t.feats, weight, bias, *windows(t.geom, out, k, stride, padding,
                                                                          t.feats.requires_grad)), out)
        if not is_block_conv(k, stride, padding, active_out_bhw):
            return super().strided_conv(t, weight, bias, stride, padding=padding, active_out_bhw=active_out_bhw)
        out, child = block_conv(t.feats, weight, bias, t.geom, k)  # ConvNeXt's downsampling
        return PackedTensor(out, child)

    def max_pool(self, t, kernel, stride, active_out_bhw):
        check_window_op("max_pool", kernel, stride, t.batch_size, t.spatial_shape, active_out_bhw)
        out = output_geometry(t.geom, stride, active_out_bhw)
        impl, s = self.conv_plan(t.geom, out, kernel, stride)  # a pool's windows are a conv's
        if impl == "tiles":
            return PackedTensor(tile_max_pool(t.feats, conv_tile_index(t.geom, out, s, kernel, stride, kernel // 2),
                                              kernel, stride), out)
        win, _ = windows(t.geom, out, kernel, stride, kernel // 2, inverse=False)
        return PackedTensor(window_max(t.feats, win), out)

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
