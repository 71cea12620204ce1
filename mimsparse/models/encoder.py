"""The encoder contract every sparse encoder (ConvNeXt V2, ResNet) follows, written down once.

A subclass defines ``stage_dims`` and ``stage_strides`` (finest stage first) and
``forward_sparse(image, visible, return_stages)``, which returns the backend's native tensors; this
class turns them into dense maps for the decoders and holds the backend.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mimsparse.backends import Backend, get_backend
from mimsparse.masking import check_image_size


class SparseEncoder(nn.Module):
    stage_dims: tuple[int, ...]     # channels of each stage's output, finest first
    stage_strides: tuple[int, ...]  # stride of each stage's output w.r.t. the image, finest first

    # The backend is a stateless strategy object, not a module: swapping it never changes the state dict.
    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend: Backend | str) -> None:
        self._backend = get_backend(backend) if isinstance(backend, str) else backend

    @property
    def patch_size(self) -> int:
        """Total stride: the mask's patch size, so every stage sees whole patches."""
        return self.stage_strides[-1]

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    def forward_sparse(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor, return_stages: bool = False,
                       num_visible: int | None = None):
        """``num_visible``: visible patches per sample when every sample has that many (mimsparse's
        maskers keep exactly L - round(r * L)); lets a backend run without host syncs and with static
        shapes (torch.compile). None = any mask."""
        raise NotImplementedError

    def check_mask(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor) -> None:
        """The image is a multiple of the patch size and the mask has one entry per patch."""
        b, _, h, w = image_bchw.shape
        grid = check_image_size(h, w, self.patch_size)
        if visible_bhw.shape != (b, *grid):
            raise ValueError(f"mask shape {tuple(visible_bhw.shape)} != (batch, H/{self.patch_size}, "
                             f"W/{self.patch_size}) = {(b, *grid)}")

    def forward(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor | None = None,
                num_visible: int | None = None) -> torch.Tensor:
        """Dense [B, C_last, H/p, W/p] features, zero at masked patches. No mask = all visible.
        ``num_visible``: see :meth:`forward_sparse`."""
        visible_bhw = self._all_visible(image_bchw) if visible_bhw is None else visible_bhw
        return self.backend.to_dense(self.forward_sparse(image_bchw, visible_bhw, num_visible=num_visible))

    def forward_hierarchical(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor | None = None,
                             num_visible: int | None = None) -> list[torch.Tensor]:
        """Dense features of every stage, finest first: [B, stage_dims[i], H/stage_strides[i],
        W/stage_strides[i]], zero at the sites of masked patches. No mask = all visible."""
        visible_bhw = self._all_visible(image_bchw) if visible_bhw is None else visible_bhw
        stages = self.forward_sparse(image_bchw, visible_bhw, return_stages=True, num_visible=num_visible)
        return [self.backend.to_dense(x) for x in stages]

    def _all_visible(self, image_bchw: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image_bchw.shape
        grid = check_image_size(h, w, self.patch_size)
        return torch.ones(b, *grid, dtype=torch.bool, device=image_bchw.device)
