"""The C ABI's pieces that need no compiler: the header as the build reads it, and the
microstructure table of a C config."""

from __future__ import annotations

import re

import pytest

from neuroscale_couple.capi.build import HEADER, header_parts, internal
from neuroscale_couple.capi.session import structure_table
from neuroscale_couple.errors import InputError


def test_the_build_reads_every_prototype_and_constant_of_the_header():
    defines, struct, prototypes = header_parts()
    names = [re.search(r"\b(ns_\w+)\s*\(", p).group(1) for p in prototypes]
    assert names == ["ns_create", "ns_register", "ns_evaluate", "ns_begin_step", "ns_end_step",
                     "ns_checkpoint", "ns_restore", "ns_destroy"]
    assert "#define NS_ERR_INPUT 1" in defines and "#define NS_SOURCE_FINE 1" in defines
    assert struct.startswith("typedef struct ns_step_report")
    twins = internal(prototypes)
    assert "int nsi_evaluate(int handle, int64_t n," in twins and "ns_" not in twins.replace(
        "nsi_", "").replace("ns_step_report", "")
    # ns_last_error is C's own (it must work when Python did not start)
    assert "ns_last_error" in HEADER.read_text() and "ns_last_error" not in twins


def test_microstructure_ids_as_seeds_or_list_indices():
    seeded = structure_table({"kind": "random_fibres", "volume_fraction": 0.3, "n_fibres": 2})
    assert seeded(3) is seeded(3) and seeded(3).key != seeded(4).key
    listed = structure_table([{"kind": "laminate", "volume_fraction": 0.4},
                              {"kind": "single_fibre", "volume_fraction": 0.2}])
    assert listed(1).kind == "single_fibre"
    with pytest.raises(InputError, match="ids 0 to 1"):
        listed(2)
    with pytest.raises(InputError, match="microstructures"):
        structure_table("random")
    with pytest.raises(InputError, match="unknown key"):
        structure_table({"kind": "random_fibres", "volume_fracton": 0.3})(0)
