"""MinkowskiEngine's side of the minkowski backend: the native tensor (``MinkowskiTensor``: an
``ME.SparseTensor`` plus what ME does not keep) and the caches derived from its coordinate map (grid
coordinates, raster order, output-site maps, kernel maps). Importing this module imports ME and
limits the OpenBLAS it calls to one thread (minkowski.py's docstring, "Threads")."""
from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass, field

import torch

with warnings.catch_warnings():
    # a CPU-only build warns at every import that it is one
    warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY flag")
    import MinkowskiEngine as ME
    from MinkowskiEngineBackend._C import ConvolutionMode, CoordinateMapType


def _limit_blas_threads() -> None:
    """One thread for the OpenBLAS that ME's CPU convolutions call, unless OPENBLAS_NUM_THREADS says
    otherwise. Its gemms here are small (the strided convs) and run while torch's OpenMP workers may
    still be spinning; a second pool of busy threads would only oversubscribe the cores. No-op where
    ME was linked against another BLAS."""
    if "OPENBLAS_NUM_THREADS" in os.environ or not hasattr(os, "RTLD_NOLOAD"):
        return
    try:
        lib = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)  # the copy ME loaded, never a new one
        lib.openblas_set_num_threads(1)
    except (OSError, AttributeError):
        pass


_limit_blas_threads()


@dataclass(eq=False)
class MinkowskiTensor:
    """The backend's native tensor: an ``ME.SparseTensor`` plus what it cannot tell.

    st:            ME tensor; coordinates (b, y * ts, x * ts) with ts = its tensor stride.
    batch_size:    B (samples without sites included).
    spatial_shape: (H, W) of this grid.
    stride:        image pixels per site.
    cache:         per set of sites: index tensors and kernel maps derived from the coordinates.
                   ``with_feats`` shares it; ``downsample`` starts a new one.
    """

    st: ME.SparseTensor
    batch_size: int
    spatial_shape: tuple[int, int]
    stride: int = 1
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def feats(self) -> torch.Tensor:
        """Feature rows [N, C] (ME's ``F``), named as every backend's tensor names them."""
        return self.st.F

    @property
    def key(self):
        return self.st.coordinate_map_key

    @property
    def manager(self) -> ME.CoordinateManager:
        return self.st.coordinate_manager

    @property
    def tensor_stride(self) -> int:
        return int(self.st.tensor_stride[0])

    def replace(self, feats: torch.Tensor) -> "MinkowskiTensor":
        st = ME.SparseTensor(feats, coordinate_map_key=self.key, coordinate_manager=self.manager)
        return MinkowskiTensor(st, self.batch_size, self.spatial_shape, self.stride, self.cache)

    def grid_coords(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int64 (b, y, x) of each row, in units of this grid."""
        if "bxy" not in self.cache:
            c = self.manager.get_coordinates(self.key).to(self.feats.device).long()
            ts = self.tensor_stride
            self.cache["bxy"] = (c[:, 0], torch.div(c[:, 1], ts, rounding_mode="floor"),
                                 torch.div(c[:, 2], ts, rounding_mode="floor"))
        return self.cache["bxy"]

    def flat_index(self) -> torch.Tensor:
        """int64 [N]: (b * H + y) * W + x of each row."""
        if "flat" not in self.cache:
            b, y, x = self.grid_coords()
            h, w = self.spatial_shape
            self.cache["flat"] = (b * h + y) * w + x
        return self.cache["flat"]

    def raster_order(self) -> torch.Tensor | None:
        """Permutation to (batch, raster) order, or None when the rows already are in it."""
        if "order" not in self.cache:
            flat = self.flat_index()
            ordered = flat.numel() < 2 or bool((flat[1:] > flat[:-1]).all())
            self.cache["order"] = None if ordered else flat.argsort()
        return self.cache["order"]

    def out_sites(self, stride: int, active_out_bhw: torch.Tensor):
        """(key, int32 (b, y, x) [M, 3] in the map's row order) of a coordinate map in this tensor's manager
        holding the sites ``active_out_bhw`` at tensor stride self.tensor_stride * stride. Reused while
        the same mask comes back for this tensor's sites: a strided block's conv and its shortcut then land
        on one map, whose rows line up for ``add``."""
        key = ("out_sites", stride)
        hit = self.cache.get(key)
        if hit is not None and torch.equal(hit[0], active_out_bhw):
            return hit[1]
        ts = self.tensor_stride * stride
        coords = active_out_bhw.nonzero().to(torch.int32)
        coords[:, 1:] *= ts
        out_key, (unique, _) = self.manager.insert_and_map(coords.contiguous(), [ts, ts], "mimsparse")
        coords = coords.index_select(0, unique.to(coords.device).long())  # the map's row order
        coords[:, 1:] //= ts
        self.cache[key] = (active_out_bhw, (out_key, coords))
        return out_key, coords

    def kernel_map(self, kh: int, kw: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """ME's stride-1 kernel map of this tensor's sites onto themselves: (offset, in rows, out rows)."""
        key = ("kernel_map", kh, kw)
        if key not in self.cache:
            kmap = self.manager.kernel_map(self.key, self.key, 1, [kh, kw], 1)
            self.cache[key] = [(k, m[0].long().to(self.feats.device), m[1].long().to(self.feats.device))
                            for k, m in sorted(kmap.items()) if m.shape[1] > 0]
        return self.cache[key]

    def __repr__(self) -> str:
        return (f"MinkowskiTensor(sites={self.feats.shape[0]}, channels={self.feats.shape[1]}, batch={self.batch_size}, "
                f"spatial_shape={self.spatial_shape}, stride={self.stride}, tensor_stride={self.tensor_stride})")


def new_tensor(feats, coords, batch_size, spatial_shape, stride, tensor_stride=1) -> MinkowskiTensor:
    """A tensor on a coordinate map of its own (``coords``: int32 (b, y, x) * tensor_stride)."""
    manager = ME.CoordinateManager(
        D=2, num_threads=torch.get_num_threads(),  # ME otherwise resets torch's thread count
        coordinate_map_type=CoordinateMapType.CUDA if feats.is_cuda else CoordinateMapType.CPU)
    # contiguous: ME refuses the column-major tensors that nonzero() returns
    st = ME.SparseTensor(feats, coordinates=coords.contiguous(), tensor_stride=tensor_stride,
                         coordinate_manager=manager)
    # ME keeps each coordinate's first row (unique_index) and may store them in another order
    # than given: the caches read the coordinates back from ME, so either is fine.
    return MinkowskiTensor(st, batch_size, spatial_shape, stride)
