"""Space-group symmetry of structure factors: equivalent reflections, absences, the asymmetric unit.

A symmetry operation maps fractional coordinates ``x -> R x + t``; it maps the structure
factor of reflection ``h`` (a row vector of Miller indices) to that of ``h R`` with the phase
shift ``exp(2 pi i h.t)``, so ``|F(h R)| = |F(h)|``. Without anomalous scattering
``|F(-h)| = |F(h)|`` as well (Friedel's law), so the amplitudes are invariant under the Laue
group ``{R} u {-R}``. A reflection with ``h R = h`` and ``h.t`` not an integer for some
operation is systematically absent (``F = 0``).

Operations are held as integer matrices ``R`` (3, 3) and translations in 1/24ths
(`DENOMINATOR`), built by closing a few generators written as coordinate triplets
(``"-x+1/2,-y,z+1/2"``). `GENERATORS` lists the space groups nbfunc knows itself; any other
of the 230 comes from gemmi when it is installed.

The asymmetric unit is nbfunc's own choice, the same with or without gemmi: each orbit of
reflections under the Laue group is represented by its largest member in lexicographic order
of ``(h, k, l)``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

DENOMINATOR = 24
"""Translations are stored as integer multiples of 1/24: every crystallographic translation
(1/2, 1/3, 1/4, 1/6, 1/8 of a cell edge, and their sums) is one."""

MAX_OPERATIONS = 192
"""Most operations a space group has (Fm-3m with its centring)."""

GENERATORS: dict[str, tuple[str, ...]] = {
    "P 1": (),
    "P -1": ("-x,-y,-z",),
    "P 1 2 1": ("-x,y,-z",),
    "P 1 21 1": ("-x,y+1/2,-z",),
    "C 1 2 1": ("-x,y,-z", "x+1/2,y+1/2,z"),
    "P 2 2 2": ("-x,-y,z", "-x,y,-z"),
    "P 2 2 21": ("-x,-y,z+1/2", "-x,y,-z+1/2"),
    "P 21 21 2": ("-x,-y,z", "-x+1/2,y+1/2,-z"),
    "P 21 21 21": ("-x+1/2,-y,z+1/2", "-x,y+1/2,-z+1/2"),
    "C 2 2 21": ("-x,-y,z+1/2", "-x,y,-z+1/2", "x+1/2,y+1/2,z"),
    "C 2 2 2": ("-x,-y,z", "-x,y,-z", "x+1/2,y+1/2,z"),
    "I 2 2 2": ("-x,-y,z", "-x,y,-z", "x+1/2,y+1/2,z+1/2"),
    "P 4": ("-y,x,z",),
    "P 41": ("-y,x,z+1/4",),
    "P 43": ("-y,x,z+3/4",),
    "I 4": ("-y,x,z", "x+1/2,y+1/2,z+1/2"),
    "P 4 2 2": ("-y,x,z", "-x,y,-z"),
    "P 41 21 2": ("-y+1/2,x+1/2,z+1/4", "-x+1/2,y+1/2,-z+1/4"),
    "P 43 21 2": ("-y+1/2,x+1/2,z+3/4", "-x+1/2,y+1/2,-z+3/4"),
    "P 3": ("-y,x-y,z",),
    "P 31": ("-y,x-y,z+1/3",),
    "P 32": ("-y,x-y,z+2/3",),
    "H 3": ("-y,x-y,z", "x+2/3,y+1/3,z+1/3"),
    "P 3 2 1": ("-y,x-y,z", "y,x,-z"),
    "P 31 2 1": ("-y,x-y,z+1/3", "y,x,-z"),
    "P 32 2 1": ("-y,x-y,z+2/3", "y,x,-z"),
    "P 6": ("x-y,x,z",),
    "P 61": ("x-y,x,z+1/6",),
    "P 65": ("x-y,x,z+5/6",),
    "P 6 2 2": ("x-y,x,z", "y,x,-z"),
    "P 61 2 2": ("x-y,x,z+1/6", "y,x,-z+1/3"),
    "P 2 3": ("-x,-y,z", "-x,y,-z", "z,x,y"),
    "P 21 3": ("-x+1/2,-y,z+1/2", "-x,y+1/2,-z+1/2", "z,x,y"),
    "I 2 3": ("-x,-y,z", "-x,y,-z", "z,x,y", "x+1/2,y+1/2,z+1/2"),
    "P 4 3 2": ("-y,x,z", "z,x,y"),
}
"""Generators (coordinate triplets) of the space groups nbfunc knows without gemmi, keyed by
the full Hermann-Mauguin symbol in gemmi's spelling (``"H 3"``: R3 on hexagonal axes)."""

ALIASES = {"P2": "P 1 2 1", "P21": "P 1 21 1", "C2": "C 1 2 1", "R3": "H 3", "R3:H": "H 3"}
"""Short symbols that do not follow from removing spaces from a key of `GENERATORS`."""


@dataclass(frozen=True, eq=False)
class SpaceGroup:
    """A space group's operations.

    Attributes:
        name: Hermann-Mauguin symbol (gemmi's spelling for gemmi groups).
        rotations: (ops, 3, 3) int64, ``R`` acting on fractional coordinates (columns).
        translations: (ops, 3) int64, ``t`` in units of 1/`DENOMINATOR`, in [0, 24).
    """

    name: str
    rotations: np.ndarray
    translations: np.ndarray

    @property
    def order(self) -> int:
        """Number of operations (centring included)."""
        return len(self.rotations)


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------
_TERM = re.compile(r"([+-]?)(\d+/\d+|\d+|[xyz])")


def parse_triplet(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(R (3, 3) int64, t (3,) int64 in 1/24ths)`` of a coordinate triplet.

    >>> parse_triplet("-y,x-y,z+1/3")[1].tolist()
    [0, 0, 8]

    Raises:
        ValueError: text that is not three comma-separated linear forms in x, y, z.
    """
    parts = text.replace(" ", "").lower().split(",")
    rot, tran = np.zeros((3, 3), dtype=np.int64), np.zeros(3, dtype=np.int64)
    if len(parts) != 3:
        raise ValueError(f"symmetry operation {text!r} needs three comma-separated parts, e.g. "
                         "'-x,y+1/2,-z'")
    for row, part in enumerate(parts):
        if not part or "".join(m.group(0) for m in _TERM.finditer(part)) != part:
            raise ValueError(f"symmetry operation {text!r}: cannot read {part!r}; write terms "
                             "such as -x, y, z+1/2")
        for sign, token in _TERM.findall(part):
            s = -1 if sign == "-" else 1
            if token in "xyz":
                rot[row, "xyz".index(token)] += s
            else:
                tran[row] += s * Fraction(token) * DENOMINATOR
    return rot, tran % DENOMINATOR


def compose(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray]:
    """The operation ``a`` after ``b``: ``(Ra Rb, Ra tb + ta)`` (translations mod 1)."""
    return a[0] @ b[0], (a[0] @ b[1] + a[1]) % DENOMINATOR


def close_group(generators: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every product of ``generators`` and the identity: the group they generate.

    Raises:
        ValueError: more than `MAX_OPERATIONS` operations (generators of no space group).
    """
    identity = (np.eye(3, dtype=np.int64), np.zeros(3, dtype=np.int64))
    key = lambda op: (op[0].tobytes(), op[1].tobytes())
    group = {key(identity): identity}
    frontier = [identity]
    while frontier:
        fresh = []
        for op in frontier:
            for gen in generators:
                new = compose(gen, op)
                if key(new) not in group:
                    group[key(new)] = new
                    fresh.append(new)
        if len(group) > MAX_OPERATIONS:
            raise ValueError(f"the generators give more than {MAX_OPERATIONS} operations; they "
                             "do not generate a space group")
        frontier = fresh
    return sorted(group.values(), key=lambda op: (op[0].tolist(), op[1].tolist()))


def _squeezed(name: str) -> str:
    return name.replace(" ", "").replace("_", "").upper()


def space_group(name: str) -> SpaceGroup:
    """The space group called ``name`` (``"P 21 21 21"``, ``"P212121"``, ``"C2"``, ...).

    From `GENERATORS` when listed there, else from gemmi (any of the 230, any spelling gemmi
    reads).

    Raises:
        ValueError: a name neither table knows (one line, with the fix).
    """
    key = _squeezed(str(name))
    table = {_squeezed(k): k for k in GENERATORS} | {_squeezed(k): v for k, v in ALIASES.items()}
    if key in table:
        full = table[key]
        ops = close_group([parse_triplet(t) for t in GENERATORS[full]])
        return _from_ops(full, ops)
    try:
        import gemmi
    except ImportError:
        raise ValueError(f"space group {name!r} is not in nbfunc's table ({', '.join(GENERATORS)}); "
                         "install gemmi (pip install gemmi) for all 230") from None
    found = gemmi.find_spacegroup_by_name(str(name))
    if found is None:
        raise ValueError(f"space group {name!r} is unknown to gemmi and to nbfunc; give a "
                         "Hermann-Mauguin symbol such as 'P 21 21 21'")
    ops = close_group([parse_triplet(op.triplet()) for op in found.operations()])
    return _from_ops(found.hm, ops)


def _from_ops(name: str, ops) -> SpaceGroup:
    return SpaceGroup(name, np.stack([r for r, _ in ops]), np.stack([t for _, t in ops]))


def laue_rotations(group: SpaceGroup) -> np.ndarray:
    """(n, 3, 3) the distinct rotations of the Laue group: ``{R} u {-R}``."""
    both = np.concatenate([group.rotations, -group.rotations])
    return np.unique(both, axis=0)


# --------------------------------------------------------------------------------------------
# Reflections
# --------------------------------------------------------------------------------------------
def equivalents(hkl: np.ndarray, group: SpaceGroup) -> np.ndarray:
    """(n, laue, 3) every Laue-equivalent of each reflection ``hkl`` (n, 3) (Friedel mates
    included), ``h R`` for each rotation."""
    return np.einsum("ni,rij->nrj", np.asarray(hkl, dtype=np.int64), laue_rotations(group))


def representatives(hkl: np.ndarray, group: SpaceGroup) -> np.ndarray:
    """(n, 3) the lexicographically largest equivalent of each reflection (n, 3): the
    asymmetric-unit member that stands for its orbit.

    >>> representatives(np.array([[-1, 2, -3]]), space_group("P 21 21 21")).tolist()
    [[1, 2, 3]]
    """
    eq = equivalents(hkl, group)
    scale = int(np.abs(eq).max(initial=0)) * 2 + 1
    code = (eq[..., 0] * scale + eq[..., 1]) * scale + eq[..., 2]
    return np.take_along_axis(eq, code.argmax(1)[:, None, None], axis=1)[:, 0]


def systematically_absent(hkl: np.ndarray, group: SpaceGroup) -> np.ndarray:
    """(n,) bool: reflections ``hkl`` (n, 3) that the space group extinguishes (``h R = h``
    and ``h.t`` not an integer for some operation).

    >>> systematically_absent(np.array([[1, 0, 0], [2, 0, 0]]), space_group("P 21 21 21")).tolist()
    [True, False]
    """
    h = np.asarray(hkl, dtype=np.int64)
    fixed = (np.einsum("ni,rij->nrj", h, group.rotations) == h[:, None, :]).all(-1)
    shifted = (h @ group.translations.T) % DENOMINATOR != 0
    return (fixed & shifted).any(1)


def reciprocal_metric(cell: tuple[float, float, float, float, float, float]) -> np.ndarray:
    """(3, 3) the reciprocal metric tensor G* (1/Angstrom^2) of cell constants (Angstrom,
    deg): ``1/d^2 = h G* h^T``."""
    a, b, c = cell[:3]
    al, be, ga = (math.radians(x) for x in cell[3:])
    g = np.array([[a * a, a * b * math.cos(ga), a * c * math.cos(be)],
                  [a * b * math.cos(ga), b * b, b * c * math.cos(al)],
                  [a * c * math.cos(be), b * c * math.cos(al), c * c]])
    return np.linalg.inv(g)


def check_cell(group: SpaceGroup, cell, tolerance: float = 1e-4) -> None:
    """Refuse cell constants (Angstrom, deg) that the group's rotations do not preserve
    (``R^T G R != G`` for the real metric ``G``, relative ``tolerance``).

    Raises:
        ValueError: naming the cell and the group (one line).
    """
    g = np.linalg.inv(reciprocal_metric(cell))
    worst = max(float(np.abs(r.T @ g @ r - g).max()) for r in group.rotations.astype(float))
    if worst > tolerance * float(np.abs(g).max()):
        shown = ", ".join(f"{x:g}" for x in cell)
        raise ValueError(f"cell ({shown}) does not have the symmetry of {group.name} (metric "
                         f"changed by {worst:.3g} A^2); give the cell constants of that lattice, "
                         "e.g. a = b and gamma = 120 for a hexagonal group")


def resolution(hkl: np.ndarray, cell) -> np.ndarray:
    """(n,) d-spacing (Angstrom) of reflections ``hkl`` (n, 3); inf for (0, 0, 0)."""
    h = np.asarray(hkl, dtype=float)
    inv_d2 = np.einsum("ni,ij,nj->n", h, reciprocal_metric(cell), h)
    with np.errstate(divide="ignore"):
        return 1 / np.sqrt(inv_d2)
