"""Glue to host codes (installed as ``neuroscale_couple.adapters``): FEniCSx, ASE, LAMMPS."""
