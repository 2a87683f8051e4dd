"""Plane-strain Neo-Hookean hyperelasticity of a strip clamped at x = 0 and pulled by a traction.

``hyperelasticity.py`` is a single-scale DOLFINx script as the DOLFINx hyperelasticity tutorials
write it (here in 2D): find u with u = 0 on x = 0 and

    ∫ P(F) : ∇v dx = ∫ T · v ds   on x = L,   F = I + ∇u,

P = ∂ψ/∂F of the compressible Neo-Hookean energy ψ = μ/2 (I₁ − 3) − μ ln J + λ/2 (ln J)²
(I₁ = tr C + 1 in plane strain). ``hyperelasticity_fe2.py`` is its FE² twin, six lines apart:
the stress P̄(F̄) at every quadrature point is the homogenized stress of a periodic unit cell
(one centred fibre) solved by DOLFINx, the Coupler configured by ``hyperelasticity_fe2.yaml``
(classic FE², no operator: give ``model:`` and ``policy: {rtol: ...}`` for the operator with
fallback). The twin's Neo-Hookean lines above ``P`` are unused: the micro solver has the law.
Its fibre is of the matrix material, so the twin reproduces the single-scale answer
(tests/integration/test_plugin.py checks it).

Run: ``mpiexec -n 2 python examples/plugin/hyperelasticity.py`` (or ``..._fe2.py``).
"""

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import NonlinearProblem

from neuroscale_couple.adapters.fenicsx import MicroStress
from neuroscale_couple.solvers.microstructure import single_fibre

L, H = 4.0, 1.0
domain = mesh.create_rectangle(MPI.COMM_WORLD, [[0.0, 0.0], [L, H]], [4, 1],
                               mesh.CellType.triangle)
V = fem.functionspace(domain, ("Lagrange", 2, (2,)))
fdim = domain.topology.dim - 1
left = mesh.locate_entities_boundary(domain, fdim, lambda x: np.isclose(x[0], 0.0))
right = mesh.locate_entities_boundary(domain, fdim, lambda x: np.isclose(x[0], L))
facet_tags = mesh.meshtags(domain, fdim, right, np.full_like(right, 2))
bcs = [fem.dirichletbc(np.zeros(2), fem.locate_dofs_topological(V, fdim, left), V)]

u = fem.Function(V, name="displacement")
v = ufl.TestFunction(V)
T = fem.Constant(domain, np.zeros(2))  # traction on x = L (GPa)
micro = MicroStress(u, __file__.replace(".py", ".yaml"), single_fibre(0.3))  # P̄ from RVEs

E, nu = 3.0, 0.35  # an epoxy-like matrix (GPa)
mu = fem.Constant(domain, E / (2 * (1 + nu)))
lmbda = fem.Constant(domain, E * nu / ((1 + nu) * (1 - 2 * nu)))
F = ufl.variable(ufl.Identity(2) + ufl.grad(u))
J = ufl.det(F)
Ic = ufl.tr(F.T * F) + 1
psi = (mu / 2) * (Ic - 3) - mu * ufl.ln(J) + (lmbda / 2) * ufl.ln(J) ** 2
P = micro.stress

metadata = {"quadrature_degree": 2}
dx = ufl.Measure("dx", domain=domain, metadata=metadata)
ds = ufl.Measure("ds", domain=domain, subdomain_data=facet_tags)
residual = ufl.inner(P, ufl.grad(v)) * dx - ufl.inner(T, v) * ds(2)

petsc_options = {"snes_type": "newtonls", "snes_linesearch_type": "basic", "snes_rtol": 1e-12,
                 "snes_atol": 1e-12, "ksp_type": "preonly", "pc_type": "lu",
                 "pc_factor_mat_solver_type": "mumps"}
problem = NonlinearProblem(residual, u, bcs=bcs, petsc_options_prefix="hyperelasticity_",
                           petsc_options=petsc_options)
micro.attach(problem)  # update P̄ at each residual; each solve() is a load step

# Load, unload halfway and load again: the path of a hyperelastic body does not matter.
for step, t in enumerate([0.05, 0.1, 0.05, 0.15]):
    T.value[0] = t
    problem.solve()
    reason = problem.solver.getConvergedReason()
    assert reason > 0, f"Newton did not converge at T = {t} (SNES reason {reason})"
    tip = domain.comm.allreduce(float(np.abs(u.x.array).max()), op=MPI.MAX)
    if domain.comm.rank == 0:
        print(f"step {step}: T = {t:.2f} GPa, Newton {problem.solver.getIterationNumber()}, "
              f"max |u| = {tip:.5f}")
