"""Baseline surrogates of the homogenised response, for the comparison with the operator
(bench/baselines.py): one module per model, one contract (:class:`.base.Baseline`).

Re-implementations are named "-style"; the FNO is the ``neuraloperator`` package's (an optional
dependency: the ``baselines`` extra).
"""

from __future__ import annotations

from neuroscale_couple.baselines.base import Baseline, stress_and_tangent
from neuroscale_couple.baselines.equino import EquiNOStyle
from neuroscale_couple.baselines.fno import FNOBaseline
from neuroscale_couple.baselines.measures import major_symmetry_error, objectivity_error
from neuroscale_couple.baselines.mlp import DescriptorMLP, descriptors
from neuroscale_couple.baselines.pipno import PIPNOStyle
from neuroscale_couple.baselines.ppino import PPINOStyle

__all__ = ["Baseline", "DescriptorMLP", "EquiNOStyle", "FNOBaseline", "PIPNOStyle", "PPINOStyle",
           "descriptors", "major_symmetry_error", "objectivity_error", "stress_and_tangent"]
