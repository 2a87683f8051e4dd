"""FNO baseline: the Fourier neural operator of the ``neuraloperator`` package on the cell image,
the macro load entering as constant input channels, its output field averaged over the cell.

Input channels: the fibre-fraction image (1, n, n) and the four components of (F̄ − I)/e_ref,
each constant over the cell; output: four channels whose cell average is P̄/σ_ref. The
tangent is by autograd through the whole network (the FNO has no closed form).
"""

from __future__ import annotations

import torch

from neuroscale_couple.baselines.base import Baseline, image_and_load
from neuroscale_couple.errors import InputError

INSTALL = (".venv/bin/pip install --target out/pydeps --no-deps neuraloperator==2.0.0 tensorly "
           "tensorly-torch opt-einsum requests urllib3 idna certifi, then put out/pydeps on "
           "PYTHONPATH (or pip install neuroscale-couple[baselines])")


def neuralop_fno():
    """The ``neuralop.models.FNO`` class; :class:`InputError` naming the install command where
    the optional package is missing."""
    try:
        from neuralop.models import FNO
    except ImportError as err:
        raise InputError(f"the FNO baseline needs the optional package neuraloperator "
                         f"({err}): install it with {INSTALL}") from None
    return FNO


class FNOBaseline(Baseline):
    """``neuralop`` FNO (``modes`` Fourier modes per axis, ``width`` channels, ``layers``
    Fourier layers) on images (B, 1, n, n) with F̄ as constant channels, cell-averaged to P̄."""

    name = "FNO (neuraloperator)"

    def __init__(self, *, modes: int = 8, width: int = 32, layers: int = 4) -> None:
        super().__init__(members=1)
        self.fno = neuralop_fno()(n_modes=(modes, modes), hidden_channels=width,
                                  in_channels=5, out_channels=4, n_layers=layers)

    def member_stress(self, k: int, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        cell_mean = self.fno(image_and_load(x, F, self.e_ref)).mean((-1, -2))
        return cell_mean.unflatten(-1, (2, 2)) * self.sigma_ref
