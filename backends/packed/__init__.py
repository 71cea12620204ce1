"""Packed backend: pure torch, features kept as packed rows ``[N_visible, C]`` in ``SparseBatch`` order
(batch, then raster), so ``to_sparse`` is free and every per-site op (norms, MLPs, activations, GRN,
residual adds) costs only the visible sites.

Read in the order of the data path:

- ``geometry.py``  ``PackedGeometry``: the active sites of one stage and every index derived from them
  (row <-> dense position, tile plans, downsampling children, scratch buffers), cached on it and shared
  by all tensors of the stage; nothing lives in module globals. ``PackedTensor`` = rows + geometry.
- ``scatter.py``   rows -> zero dense map and back, and the rows of rectangular windows of the map
  (conv windows, halo tiles): the primitives below build on.
- ``tiles.py``     halo tiles: which s x s blocks hold active sites, the plan laying them out for one
  grouped conv, the tile kernels and the cost model choosing the tile size.
- ``blocks.py``    k x k / stride k downsampling: the k*k children rows of every output site.
- ``windows.py``   the k x k windows of ResNet's convs and max pool, and a strided op's output geometry.
- ``tile_conv.py`` / ``gather_conv.py`` / ``subm_conv.py``: full k x k convs (any stride) over halo
  tiles of the mask's blocks (and the max pool over them), as a gather-GEMM over the windows, or
  through the dense map.
- ``dwconv.py`` / ``permute.py``: the depthwise conv and the layout changes, as autograd functions.
- ``backend.py``   ``PackedBackend``, the ``Backend`` interface dispatching to the above; ``conv_plan``
  picks a k x k conv's implementation (halo tiles where the output blocks are at least 4x4 sites at
  stride 1, 8x8 at stride 2, else the gather-GEMM; measured per ResNet-50 conv shape, BENCHMARKS.md).

How a depthwise conv over packed rows is computed (stride 1, submanifold: the output sites are the
input sites). The active sites are covered with the s x s blocks that hold one of them (s = 4 or 8,
chosen per stage by a cost estimate; the whole map when the stage is dense-ish). Each block plus a
k//2 halo is a tile; the tile inputs are gathered from the rows (a zero row stands in for inactive
or outside sites) into a channels-last map whose channel blocks are the tiles, so one grouped
``conv2d`` with the kernel repeated runs every tile, and the interior outputs are read back as rows.
Backward: the input gradient is the same tiled conv of the output gradient with the flipped kernel;
the weight gradient is a conv of the input tiles with the output-gradient tiles as kernels (on CPU
much faster than oneDNN's depthwise weight gradient).

Why static mode exists. The general geometry finds its sites with ``nonzero`` and counts rows per
sample on the host: a host sync per stage on a GPU, and data-dependent shapes that break a
``torch.compile`` graph. mimsparse's maskers keep the same number n of whole patches per sample, so
with ``patch_embed(..., rows_per_sample=n, block=s)`` every size is known from n and s: sites come
from a stable sort of each sample's mask, counts are checked on the device (``torch._assert_async``),
and every op is traceable torch. ``torch.compile(fullgraph=True, dynamic=False)`` then traces the whole
train step once and replays it for any mask with that count.
"""
from .backend import PackedBackend
from .dwconv import _StaticDWConv, _StaticTileDWConv, _TileDWConv
from .geometry import PackedGeometry, PackedTensor
from .scatter import _gather_static, _pad_row, _scatter_static
from .subm_conv import _SubmConv
from .tiles import TILE_CHUNK_FLOATS, TilePlan

__all__ = ["PackedBackend", "PackedGeometry", "PackedTensor", "TilePlan", "TILE_CHUNK_FLOATS"]
