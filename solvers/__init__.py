"""True fine-scale solvers (installed as ``neuroscale_couple.solvers``).

They need DOLFINx/gmsh (``rve_fenicsx``, ``microstructure``) or ASE (``cauchy_born``); import the
submodule you need, this package imports nothing heavy.
"""
