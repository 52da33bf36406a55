"""Physical constants and the unit conversions of the parameter tree (one place)."""
import math

R_E_SQR = 7.94079248018965e-30
"""Thomson cross section r_e^2 (m^2), the value nanoBragg uses."""
AVOGADRO = 6.02214179e23
"""Avogadro's number (1/mol), the value nanoBragg uses."""
WATER_F = 2.57
"""Forward scattering amplitude of water (electrons)."""
WATER_MW = 18.0
"""Molar mass of water (g/mol)."""
HC_EV_ANGSTROM = 12398.42
"""h*c in eV*Angstrom, used by nanoBragg's -energy flag."""

ANGSTROM = 1e-10
MM = 1e-3
UM = 1e-6
MRAD = 1e-3
DEG = math.pi / 180.0
