"""Read nanoBragg command-line flags into `CFlags`, the way the C program's argument loops do.

nanoBragg tests every argument that starts with ``-`` against every flag handler in its source
order (not else-if), matching names by substring (``strstr``), with a few exact (``strcmp``) and
length conditions, and stops early after some handlers (C ``continue``). One argument can
therefore trigger several handlers: ``-twotheta_axis x y z`` also sets the two-theta angle to x,
``-misset_seed s`` also sets misset angles. `HANDLERS` lists the handlers in C order with the
match rule, the values each reads and the C variables each writes, in C's internal units.

Differences from the C program, so that nbfunc is a safe drop-in:

* the values a flag reads are not themselves tested as flags, so negative numbers are values;
* unknown flags, stray arguments, missing values, non-numeric, NaN or infinite numbers raise
  `FlagError` (C ignores them, reads 0, or crashes), and so do values without physical meaning:
  lengths and wavelengths that must be positive, pixel counts below 1, negative sizes, ranges,
  spreads and fluxes (C divides by zero, or reads a negative value as "not given");
* where C silently ignores or overrides a flag, its behaviour is kept and a one-line warning is
  added to `CFlags.warnings`;
* ``-h``/``-help``/``--help`` raise `HelpRequested` and ``--version``/``-version``
  `VersionRequested`; ``-dtype``, ``-chunk``, ``-device``, ``-cbffile``, ``-nxsfile`` and
  ``-nxs_compression``, ``-params_out`` and ``-params`` are nbfunc extensions, and so are the
  model flags ``-Ndef``, ``-G``, ``-gauss_hkl_xtal``, ``-diffuse``, ``-diffuse_gamma``,
  ``-diffuse_sigma``, ``-laue_group``, ``-bfactor``, ``-spectrum``, ``-bandwidth`` and
  ``-bandwidth_steps`` (listed next to the C flags they extend; all match their exact name).

Arguments are the tokens after the program name (``sys.argv[1:]``).
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from nbfunc.cli.cflags import CFlags, RTD

__all__ = [
    "FlagError",
    "HelpRequested",
    "VersionRequested",
    "Handler",
    "HANDLERS",
    "HELP_FLAGS",
    "VERSION_FLAGS",
    "find_header_files",
    "given_flags",
    "parse_flags",
    "known_flags",
    "triggered",
    "usage",
    "c_atof",
    "c_atoi",
]

HELP_FLAGS = ("-h", "-help", "--help")
VERSION_FLAGS = ("--version", "-version")
BEAM_PIVOT_CONVENTIONS = ("MOSFLM", "DENZO", "ADXV")
SAMPLE_PIVOT_CONVENTIONS = ("XDS", "DIALS")


class FlagError(ValueError):
    """A command line nbfunc refuses: unknown flag, stray argument, missing or bad value."""


class HelpRequested(Exception):
    """``-h``, ``-help`` or ``--help`` was given: the caller prints the usage and exits."""


class VersionRequested(Exception):
    """``--version`` or ``-version`` was given: the caller prints the version and exits."""


# ----------------------------------------------------------------------------------------------
# C number conversions


_DEC = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_HEX = r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
_SPECIAL = r"[+-]?(?:inf(?:inity)?|nan)"
_NUMBER = re.compile(rf"(?:{_HEX}|{_DEC}|{_SPECIAL})", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT32 = (-(2**31), 2**31 - 1)


def _to_float(text: str) -> float:
    """Python float of a string matched by `_NUMBER` (hex floats included)."""
    body = text.lstrip("+-")
    if body[:2].lower() == "0x":
        value = float.fromhex(body if "p" in body.lower() else body + "p0")
        return -value if text.startswith("-") else value
    return float(text)


def c_atof(text: str) -> float:
    """C ``atof``: the longest numeric prefix after leading blanks, 0.0 when there is none.

    >>> c_atof("12.5mm"), c_atof("abc"), c_atof(" -3e2")
    (12.5, 0.0, -300.0)
    """
    m = _NUMBER.match(text.lstrip(" \t\n\v\f\r"))
    return _to_float(m.group(0)) if m else 0.0


def c_atoi(text: str) -> int:
    """C ``atoi``: the leading integer after blanks, 0 when there is none (``"2.5"`` gives 2)."""
    m = _INTEGER.match(text.lstrip(" \t\n\v\f\r"))
    return int(m.group(0)) if m else 0


def _looks_numeric(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


# ----------------------------------------------------------------------------------------------
# values a handler reads: strict (errors, nbfunc) and as C reads them (secondary matches)


def _quoted(args: Sequence[str]) -> str:
    return " ".join(repr(a) for a in args)


def _missing(label: str, expect: str, got: Sequence[str]) -> FlagError:
    if not got:
        return FlagError(f"{label} expects {expect}, but nothing follows it")
    return FlagError(f"{label} expects {expect}, got only {len(got)}: {_quoted(got)}")


def _strict_float(label: str, expect: str, text: str) -> float:
    if not _looks_numeric(text):
        raise FlagError(f"{label} expects {expect}, got {text!r}")
    value = _to_float(text)
    if not math.isfinite(value):
        raise FlagError(f"{label} expects {expect} (a finite value), got {text!r}")
    return value


def _strict_int(label: str, expect: str, text: str) -> int:
    if _INTEGER.fullmatch(text) is None:
        raise FlagError(f"{label} expects {expect} (a whole number), got {text!r}")
    value = int(text)
    if not _INT32[0] <= value <= _INT32[1]:
        raise FlagError(f"{label} expects {expect} within a C int's range, got {text!r}")
    return value


@dataclass(frozen=True)
class Numbers:
    """``count`` numbers (``atof``, or ``atoi`` when ``integer``)."""

    count: int
    expect: str
    integer: bool = False
    nonzero: bool = False
    nonnegative: bool = False
    positive: bool = False
    meta: str = ""

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        if len(args) < self.count:
            raise _missing(label, self.expect, args)
        parse = _strict_int if self.integer else _strict_float
        values = tuple(parse(label, self.expect, a) for a in args[: self.count])
        if self.nonzero and any(v == 0 for v in values):
            raise FlagError(f"{label} expects {self.expect} other than zero, got {_quoted(args[:self.count])}")
        if self.nonnegative and any(v < 0 for v in values):
            raise FlagError(f"{label} expects {self.expect} of at least 0, got {_quoted(args[:self.count])}")
        if self.positive and any(v <= 0 for v in values):
            raise FlagError(f"{label} expects {self.expect} greater than 0, got {_quoted(args[:self.count])}")
        return values

    def c_read(self, args: Sequence[str]) -> tuple | None:
        if len(args) < self.count:
            return None
        parse = c_atoi if self.integer else c_atof
        return tuple(parse(a) for a in args[: self.count])

    def usage(self) -> str:
        return self.meta or self.expect


@dataclass(frozen=True)
class OneOrThree:
    """One number (the same along x, y and z) or three: the values stop at the first argument
    that is not a number (nbfunc's flags only). `xyz` makes three of what was read."""

    expect: str
    positive: bool = False
    nonnegative: bool = False
    meta: str = ""

    @staticmethod
    def _take(args: Sequence[str]) -> list[str]:
        taken = []
        for a in args[:3]:
            if not _looks_numeric(a):
                break
            taken.append(a)
        return taken

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        taken = self._take(args)
        if not taken:
            if not args:
                raise _missing(label, self.expect, args)
            raise FlagError(f"{label} expects {self.expect}, got {args[0]!r}")
        if len(taken) == 2:
            raise FlagError(f"{label} expects {self.expect}, got 2: {_quoted(taken)}")
        values = tuple(_strict_float(label, self.expect, a) for a in taken)
        if self.nonnegative and any(v < 0 for v in values):
            raise FlagError(f"{label} expects {self.expect} of at least 0, got {_quoted(taken)}")
        if self.positive and any(v <= 0 for v in values):
            raise FlagError(f"{label} expects {self.expect} greater than 0, got {_quoted(taken)}")
        return values

    def c_read(self, args: Sequence[str]) -> tuple | None:
        taken = self._take(args)
        return tuple(c_atof(a) for a in (taken if len(taken) == 3 else taken[:1])) or None

    @staticmethod
    def xyz(values: tuple) -> tuple:
        return values * 3 if len(values) == 1 else values

    def usage(self) -> str:
        return self.meta or self.expect


@dataclass(frozen=True)
class Text:
    """One string: a file name or a word; ``check`` says whether the word is acceptable."""

    expect: str
    check: Callable[[str], bool] | None = None
    meta: str = ""

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        if not args:
            raise _missing(label, self.expect, args)
        value = args[0]
        if value.startswith("-") and (triggered(value) or value in HELP_FLAGS):
            raise FlagError(f"{label} expects {self.expect}, got the flag {value!r}")
        if self.check is not None and not self.check(value):
            raise FlagError(f"{label} expects {self.expect}, got {value!r}")
        return (value,)

    def c_read(self, args: Sequence[str]) -> tuple | None:
        return (args[0],) if args else None

    def usage(self) -> str:
        return self.meta or self.expect


@dataclass(frozen=True)
class Switch:
    """No value. ``needs_next``: C's argc guard still wants another argument after the flag."""

    needs_next: bool = False

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        return self.c_read(args)

    def c_read(self, args: Sequence[str]) -> tuple | None:
        return None if self.needs_next and not args else ()

    def usage(self) -> str:
        return ""


@dataclass(frozen=True)
class Cell:
    """-cell: up to six numbers, stopping at the first argument that starts with '-' (C)."""

    expect: str = "1 to 6 numbers (a b c in Angstrom, alpha beta gamma in degrees)"

    @staticmethod
    def _take(args: Sequence[str]) -> list[str]:
        taken = []
        for a in args[:6]:
            if a.startswith("-"):
                break
            taken.append(a)
        return taken

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        taken = self._take(args)
        if not taken:
            raise _missing(label, self.expect, args[:1]) if not args else FlagError(
                f"{label} expects {self.expect}, got {args[0]!r}"
            )
        return tuple(_strict_float(label, self.expect, a) for a in taken)

    def c_read(self, args: Sequence[str]) -> tuple | None:
        return tuple(c_atof(a) for a in self._take(args)) if args else None

    def usage(self) -> str:
        return "a [b c alpha beta gamma]"


@dataclass(frozen=True)
class Misset:
    """-misset: ``random`` (any word containing 'rand') or three angles in degrees."""

    expect: str = "3 angles in degrees (x y z) or 'random'"

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        if args and "rand" in args[0]:
            return ("random",)
        if len(args) < 3:
            raise _missing(label, self.expect, args)
        return tuple(_strict_float(label, self.expect, a) for a in args[:3])

    def c_read(self, args: Sequence[str]) -> tuple | None:
        if args and "rand" in args[0]:
            return ("random",)
        return tuple(c_atof(a) for a in args[:3]) if len(args) >= 3 else None

    def usage(self) -> str:
        return "x y z | random"


@dataclass(frozen=True)
class Attenuation:
    """-detector_abs: attenuation depth in um, or a word containing 'inf', or 0 (no absorption)."""

    expect: str = "an attenuation depth in um, 'inf' or 0"

    def strict(self, label: str, args: Sequence[str]) -> tuple | None:
        if not args:
            raise _missing(label, self.expect, args)
        if "inf" in args[0]:
            return ("inf",)
        value = _strict_float(label, self.expect, args[0])
        if value < 0:
            raise FlagError(f"{label} expects {self.expect}, got {args[0]!r} (a negative depth)")
        return (value,)

    def c_read(self, args: Sequence[str]) -> tuple | None:
        if not args:
            return None
        return ("inf",) if "inf" in args[0] else (c_atof(args[0]),)

    def usage(self) -> str:
        return "um|inf"


# ----------------------------------------------------------------------------------------------
# handler table


def _sub(*needles: str) -> Callable[[str], bool]:
    """C ``strstr(argv[i], needle)`` for any of the needles."""
    return lambda tok: any(n in tok for n in needles)


def _sub_len(needle: str, length: int) -> Callable[[str], bool]:
    """C ``strstr(argv[i], needle) && strlen(argv[i]) == length``."""
    return lambda tok: needle in tok and len(tok) == length


def _exact(name: str) -> Callable[[str], bool]:
    """C ``strcmp(argv[i], name) == 0`` (and nbfunc's own flags)."""
    return lambda tok: tok == name


@dataclass(frozen=True)
class Handler:
    """One ``if(strstr(argv[i], ...))`` block of nanoBragg's argument loop.

    names: documented spellings, canonical first. match: the C condition on the flag itself.
    values: what the handler reads after the flag. apply: values -> CFlags field updates.
    stop: C ``continue`` after the block (a callable decides from the values). help: one line.
    """

    names: tuple[str, ...]
    match: Callable[[str], bool]
    values: Numbers | OneOrThree | Text | Switch | Cell | Misset | Attenuation
    apply: Callable[[tuple], dict]
    help: str
    stop: bool | Callable[[tuple], bool] = False
    nbfunc: bool = False

    @property
    def name(self) -> str:
        return self.names[0]

    def stops(self, values: tuple) -> bool:
        return self.stop(values) if callable(self.stop) else self.stop


def _h(names, match, values, apply, help, **kw) -> Handler:
    names = (names,) if isinstance(names, str) else tuple(names)
    return Handler(names, match, values, apply, help, **kw)


_MM = Numbers(1, "a length in mm", meta="mm")
_MM_POS = Numbers(1, "a length in mm", positive=True, meta="mm")
_SIZE = Numbers(1, "a length in mm", nonnegative=True, meta="mm")
_SPREAD = Numbers(1, "an angle in degrees", nonnegative=True, meta="deg")
_RANGE = Numbers(1, "an angle in mrad", nonnegative=True, meta="mrad")
_CELLS = Numbers(1, "a count", integer=True, nonnegative=True, meta="int")
_PIXELS = Numbers(1, "a pixel count", integer=True, positive=True, meta="int")
_DEG = Numbers(1, "an angle in degrees", meta="deg")
_MRAD = Numbers(1, "an angle in mrad", meta="mrad")
_NUM = Numbers(1, "a number", meta="number")
_COUNT = Numbers(1, "a count", integer=True, meta="int")
_SEED = Numbers(1, "an integer seed", integer=True, meta="int")
_VEC = Numbers(3, "3 numbers (x y z)", meta="x y z")
_FILE = Text("a file name", meta="file")
_OFF = Switch()


def _at_least_zero(expect: str, meta: str) -> Numbers:
    """One number that must be at least 0 (a size, range, spread, fluence or time)."""
    return Numbers(1, expect, nonnegative=True, meta=meta)


def _vector(field: str) -> Callable[[tuple], dict]:
    return lambda v: {"beam_convention": "CUSTOM", field: (v[0], v[1], v[2])}


def _cell(v: tuple) -> dict:
    keys = ("cell_a", "cell_b", "cell_c", "alpha", "beta", "gamma")
    out = {"user_cell": True}
    for k, x in zip(keys, v):
        out[k] = x / RTD if k in ("alpha", "beta", "gamma") else x
    return out


def _misset(v: tuple) -> dict:
    if v == ("random",):
        return {"misset_mode": -1.0}
    return {"misset_mode": 1.0, "misset": (v[0] / RTD, v[1] / RTD, v[2] / RTD)}


def _pivot(v: tuple) -> dict:
    out = {}
    if "sample" in v[0]:
        out["detector_pivot"] = "SAMPLE"
    if "beam" in v[0]:
        out["detector_pivot"] = "BEAM"
    return out


def _attenuation(v: tuple) -> dict:
    if v[0] == "inf" or v[0] == 0.0:
        return {"detector_thick": 0.0, "detector_mu": 0.0}
    return {"detector_mu": 1.0 / (v[0] * 1e-6)}


def _xyz(v: tuple) -> dict:
    return {"sample_x": v[0] / 1000, "sample_y": v[0] / 1000, "sample_z": v[0] / 1000}


def _convention(name: str, pivot: str) -> Callable[[tuple], dict]:
    return lambda v: {"beam_convention": name, "detector_pivot": pivot}


_DEVICE = re.compile(r"[a-z]+(:\d+)?")


def _laue_symbol(text: str) -> str | None:
    """The Laue group symbol of a -laue_group value: a symbol of `nbfunc.diffuse.LAUE_GROUPS`
    (spaces ignored) or diffBragg's number of one, 1 to 14 (its ``laue_group_num``); None if
    it is neither."""
    from nbfunc.diffuse import LAUE_GROUPS

    symbol = text.replace(" ", "")
    if symbol in LAUE_GROUPS:
        return symbol
    if re.fullmatch(r"[0-9]+", symbol) and 1 <= int(symbol) <= len(LAUE_GROUPS):
        return LAUE_GROUPS[int(symbol) - 1]
    return None


_LAUE_EXPECT = ("a Laue group (P-1, P112/m, P12/m1, P2/m11, Pmmm, P4/m, P4/mmm, P-3, P-3m1, "
                "P-31m, P6/m, P6/mmm, Pm-3, Pm-3m, or diffBragg's number of one, 1 to 14)")

# In nanoBragg's order; -mask (read only by the first loop) and nbfunc's flags come last.
HANDLERS: tuple[Handler, ...] = (
    # crystal size in unit cells
    _h("-Na", _sub("-Na"), _CELLS, lambda v: {"Na": float(v[0])}, "unit cells along a", stop=True),
    _h("-Nb", _sub("-Nb"), _CELLS, lambda v: {"Nb": float(v[0])}, "unit cells along b", stop=True),
    _h("-Nc", _sub("-Nc"), _CELLS, lambda v: {"Nc": float(v[0])}, "unit cells along c", stop=True),
    _h("-N", _exact("-N"), _CELLS, lambda v: {"Na": float(v[0]), "Nb": float(v[0]), "Nc": float(v[0])},
       "unit cells along a, b and c", stop=True),
    _h("-Ndef", _exact("-Ndef"), Numbers(3, "3 numbers in cells (Nd Ne Nf)", meta="Nd Ne Nf"),
       lambda v: {"Ncells_def": (v[0], v[1], v[2])},
       "off-diagonal domain-size terms, Gaussian shapes only (nbfunc)", nbfunc=True),
    _h("-G", _exact("-G"), Numbers(1, "a scale factor", positive=True, meta="number"),
       lambda v: {"G": v[0]}, "per-shot scale of the crystal's photons (nbfunc)", nbfunc=True),
    _h("-diffuse", _exact("-diffuse"), _OFF, lambda v: {"diffuse": True},
       "diffBragg's diffuse scattering around the Bragg peaks (nbfunc)", nbfunc=True),
    _h("-diffuse_gamma", _exact("-diffuse_gamma"),
       OneOrThree("1 or 3 lengths in Angstrom (gx [gy gz])", positive=True, meta="gx [gy gz]"),
       lambda v: {"diffuse_gamma": OneOrThree.xyz(v)},
       "diffuse correlation lengths along lab x, y, z; implies -diffuse (nbfunc)", nbfunc=True),
    _h("-diffuse_sigma", _exact("-diffuse_sigma"),
       OneOrThree("1 or 3 lengths in Angstrom (sx [sy sz])", nonnegative=True, meta="sx [sy sz]"),
       lambda v: {"diffuse_sigma": OneOrThree.xyz(v)},
       "diffuse displacement amplitudes along lab x, y, z; implies -diffuse (nbfunc)", nbfunc=True),
    _h("-laue_group", _exact("-laue_group"), Text(_LAUE_EXPECT, _laue_symbol, meta="symbol|1-14"),
       lambda v: {"laue_group": _laue_symbol(v[0])}, "Laue group of the diffuse scattering, "
       "default P-1 (nbfunc)", nbfunc=True),
    _h("-bfactor", _exact("-bfactor"), _at_least_zero("a B factor in Angstrom^2", "A^2"),
       lambda v: {"bfactor": v[0]}, "isotropic B factor, intensities times exp(-2 B stol^2) (nbfunc)",
       nbfunc=True),
    # unit cell and orientation
    _h("-cell", _sub("-cell"), Cell(), _cell, "direct cell (Angstrom, degrees)",
       stop=lambda v: len(v) < 6),  # C `continue`s when it stops before the sixth value
    _h("-misset", _sub("-misset"), Misset(), _misset, "misset angles about x y z, or random",
       stop=lambda v: v == ("random",)),
    # crystal size in mm
    _h(("-samplesize", "-sample_size"), _sub("-samplesize", "-sample_size"), _SIZE, _xyz, "crystal size x=y=z"),
    _h(("-sample_thick", "-sample_x"), _sub("-sample_thick", "-sample_x"), _SIZE,
       lambda v: {"sample_x": v[0] / 1000}, "crystal size along x"),
    _h(("-sample_width", "-sample_y", "-width"), _sub("-sample_width", "-sample_y", "-width"), _SIZE,
       lambda v: {"sample_y": v[0] / 1000}, "crystal size along y"),
    _h(("-sample_height", "-sample_z", "-height"), _sub("-sample_heigh", "-sample_z", "-heigh"), _SIZE,
       lambda v: {"sample_z": v[0] / 1000}, "crystal size along z"),
    _h(("-xtalsize", "-xtal_size"), _sub("-xtalsize", "-xtal_size"), _SIZE, _xyz, "crystal size x=y=z"),
    _h(("-xtal_thick", "-xtal_x"), _sub("-xtal_thick", "-xtal_x"), _SIZE,
       lambda v: {"sample_x": v[0] / 1000}, "crystal size along x"),
    _h(("-xtal_width", "-xtal_y", "-width"), _sub("-xtal_width", "-xtal_y", "-width"), _SIZE,
       lambda v: {"sample_y": v[0] / 1000}, "crystal size along y"),
    _h(("-xtal_height", "-xtal_z", "-height"), _sub("-xtal_heigh", "-xtal_z", "-heigh"), _SIZE,
       lambda v: {"sample_z": v[0] / 1000}, "crystal size along z"),
    _h(("-density", "-sample_density"), _sub("-density", "-sample_den"),
       Numbers(1, "a density in g/cm^3", meta="g/cm^3"), lambda v: {"density": v[0] * 1e6}, "crystal density"),
    _h(("-MW", "-molecular_weight"), lambda t: t == "-MW" or "-molec" in t, Numbers(1, "a mass in g/mol", meta="g/mol"),
       lambda v: {"molecular_weight": v[0]}, "molecular weight"),
    # beam centre and pivot
    _h("-Xbeam", _sub("-Xbeam"), _MM, lambda v: {"Xbeam": v[0] / 1000.0, "detector_pivot": "BEAM"},
       "beam centre X (pivot BEAM)"),
    _h("-Ybeam", _sub("-Ybeam"), _MM, lambda v: {"Ybeam": v[0] / 1000.0, "detector_pivot": "BEAM"},
       "beam centre Y (pivot BEAM)"),
    _h("-Xclose", _sub("-Xclose"), _MM, lambda v: {"Xclose": v[0] / 1000.0, "detector_pivot": "SAMPLE"},
       "near point X (pivot SAMPLE)"),
    _h("-Yclose", _sub("-Yclose"), _MM, lambda v: {"Yclose": v[0] / 1000.0, "detector_pivot": "SAMPLE"},
       "near point Y (pivot SAMPLE)"),
    _h("-ORGX", _sub("-ORGX"), Numbers(1, "a position in pixels", meta="pixels"),
       lambda v: {"ORGX": v[0], "detector_pivot": "SAMPLE"}, "XDS origin, fast (pivot SAMPLE)"),
    _h("-ORGY", _sub("-ORGY"), Numbers(1, "a position in pixels", meta="pixels"),
       lambda v: {"ORGY": v[0], "detector_pivot": "SAMPLE"}, "XDS origin, slow (pivot SAMPLE)"),
    _h("-pivot", _sub("-pivot"), Text("'beam' or 'sample'", lambda s: "sample" in s or "beam" in s, meta="beam|sample"),
       _pivot, "detector pivot (CUSTOM convention only)"),
    # conventions
    _h("-mosflm", _sub("-mosflm"), _OFF, _convention("MOSFLM", "BEAM"), "MOSFLM convention"),
    _h("-xds", _sub("-xds"), _OFF, _convention("XDS", "SAMPLE"), "XDS convention"),
    _h("-adxv", _sub("-adxv"), _OFF, _convention("ADXV", "BEAM"), "ADXV convention"),
    _h("-denzo", _sub("-denzo"), _OFF, _convention("DENZO", "BEAM"), "DENZO convention"),
    _h("-dials", _sub("-dials"), _OFF, _convention("DIALS", "BEAM"), "DIALS convention"),
    _h("-fdet_vector", _sub("-fdet_vector"), _VEC, _vector("fdet_vector"), "fast axis (CUSTOM)"),
    _h("-sdet_vector", _sub("-sdet_vector"), _VEC, _vector("sdet_vector"), "slow axis (CUSTOM)"),
    _h("-odet_vector", _sub("-odet_vector"), _VEC, _vector("odet_vector"), "detector normal (CUSTOM)"),
    _h("-beam_vector", _sub("-beam_vector"), _VEC, _vector("beam_vector"), "beam direction (CUSTOM)"),
    _h("-polar_vector", _sub("-polar_vector"), _VEC, _vector("polar_vector"), "E-vector (CUSTOM)"),
    _h("-spindle_axis", _sub("-spindle_axis"), _VEC, _vector("spindle_vector"), "spindle axis (CUSTOM)"),
    _h("-twotheta_axis", _sub("-twotheta_axis"), _VEC, _vector("twotheta_axis"), "two-theta axis (CUSTOM)"),
    _h("-pix0_vector", _sub("-pix0_vector"), Numbers(3, "3 numbers in m (x y z)", meta="x y z (m)"),
       lambda v: {"beam_convention": "CUSTOM", "pix0_given": True, "pix0_vector": (v[0], v[1], v[2])},
       "switches to CUSTOM (values unused)"),
    # detector placement
    _h("-distance", _sub("-distance"), _MM_POS, lambda v: {"distance": v[0] / 1000.0, "detector_pivot": "BEAM"},
       "sample to detector along the beam (pivot BEAM)"),
    _h("-close_distance", _sub("-close_distance"), _MM_POS,
       lambda v: {"close_distance": v[0] / 1000.0, "detector_pivot": "SAMPLE"},
       "sample to detector plane (pivot SAMPLE)"),
    _h(("-detector_abs", "-detector_absorb"), _sub("-detector_abs"), Attenuation(), _attenuation,
       "sensor attenuation depth"),
    _h("-detector_thick", _sub_len("-detector_thick", 15), _at_least_zero("a thickness in um", "um"),
       lambda v: {"detector_thick": v[0] * 1e-6}, "sensor thickness"),
    _h("-detector_thicksteps", _sub("-detector_thicksteps"), _COUNT,
       lambda v: {"detector_thicksteps": v[0]}, "sensor layers"),
    _h("-thicksteps", _sub("-thicksteps"), _COUNT, lambda v: {"detector_thicksteps": v[0]}, "sensor layers"),
    _h("-twotheta", _sub("-twotheta"), _DEG,
       lambda v: {"detector_twotheta": v[0] / RTD, "detector_pivot": "SAMPLE"}, "two-theta (pivot SAMPLE)"),
    _h("-detector_rotx", _sub("-detector_rotx"), _DEG, lambda v: {"detector_rotx": v[0] / RTD}, "rotation about x"),
    _h("-detector_roty", _sub("-detector_roty"), _DEG, lambda v: {"detector_roty": v[0] / RTD}, "rotation about y"),
    _h("-detector_rotz", _sub("-detector_rotz"), _DEG, lambda v: {"detector_rotz": v[0] / RTD}, "rotation about z"),
    # detector size
    _h("-detsize", _sub_len("-detsize", 8), _MM_POS,
       lambda v: {"detsize_f": v[0] / 1000.0, "detsize_s": v[0] / 1000.0}, "square detector side"),
    _h("-detsize_f", _sub("-detsize_f"), _MM_POS, lambda v: {"detsize_f": v[0] / 1000.0}, "detector size, fast"),
    _h("-detsize_s", _sub("-detsize_s"), _MM_POS, lambda v: {"detsize_s": v[0] / 1000.0}, "detector size, slow"),
    _h("-detpixels", _sub_len("-detpixels", 10), _PIXELS,
       lambda v: {"fpixels": v[0], "spixels": v[0]}, "square detector in pixels"),
    _h(("-detpixels_f", "-detpixels_x"), _sub("-detpixels_f", "-detpixels_x"), _PIXELS,
       lambda v: {"fpixels": v[0]}, "pixels along fast"),
    _h(("-detpixels_s", "-detpixels_y"), _sub("-detpixels_s", "-detpixels_y"), _PIXELS,
       lambda v: {"spixels": v[0]}, "pixels along slow"),
    _h("-curved_det", _sub("-curved_det"), Switch(needs_next=True), lambda v: {"curved_detector": True},
       "spherical detector"),
    _h("-pixel", _sub("-pixel"), _MM_POS, lambda v: {"pixel_size": v[0] / 1000.0}, "pixel size"),
    _h("-point_pixel", _sub("-point_pixel"), _OFF, lambda v: {"point_pixel": True}, "1/R^2 solid angle"),
    # polarization and sub-pixel sampling
    _h("-polar", _sub_len("-polar", 6), Numbers(1, "a Kahn factor", meta="0..1"),
       lambda v: {"polarization": v[0], "nopolar": False}, "Kahn polarization factor"),
    _h("-nopolar", _sub("-nopolar"), _OFF, lambda v: {"nopolar": True}, "no polarization factor"),
    _h("-oversample_thick", _sub("-oversample_thick"), _OFF, lambda v: {"oversample_thick": True},
       "absorption per sub-pixel", stop=True),
    _h("-oversample_polar", _sub("-oversample_polar"), _OFF, lambda v: {"oversample_polar": True},
       "polarization per sub-pixel", stop=True),
    _h("-oversample_omega", _sub("-oversample_omega"), _OFF, lambda v: {"oversample_omega": True},
       "solid angle per sub-pixel", stop=True),
    _h("-oversample", _sub("-oversample"), _COUNT, lambda v: {"oversample": v[0]}, "sub-pixels per axis"),
    _h("-roi", _sub("-roi"),
       Numbers(4, "4 pixel indices (xmin xmax ymin ymax)", integer=True, meta="xmin xmax ymin ymax"),
       lambda v: {"roi": (v[0], v[1], v[2], v[3])}, "render only this pixel range"),
    # beam
    _h(("-lambda", "-wave"), _sub("-lambda", "-wave"), Numbers(1, "a wavelength in Angstrom", positive=True, meta="A"),
       lambda v: {"lambda0": v[0] / 1.0e10}, "wavelength"),
    _h("-energy", _sub("-energy"), Numbers(1, "a photon energy in eV", positive=True, meta="eV"),
       lambda v: {"lambda0": (12398.42 / v[0]) / 1.0e10}, "photon energy"),
    _h("-fluence", _sub("-fluence"), _at_least_zero("a fluence in photons/m^2", "photons/m^2"),
       lambda v: {"fluence": v[0]}, "fluence"),
    _h("-flux", _sub("-flux"), _at_least_zero("a flux in photons/s", "photons/s"), lambda v: {"flux": v[0]}, "flux"),
    _h("-exposure", _sub("-exposure"), _at_least_zero("a time in s", "s"), lambda v: {"exposure": v[0]}, "exposure"),
    _h("-beamsize", _sub("-beamsize"), _SIZE, lambda v: {"beamsize": v[0] / 1000}, "beam size"),
    # mosaicity, spectrum, divergence
    _h(("-mosaic", "-mosaici", "-mosaic_spread"),
       lambda t: ("-mosaic" in t and len(t) == 7) or "-mosaici" in t or "-mosaic_spr" in t, _SPREAD,
       lambda v: {"mosaic_spread": v[0] / RTD}, "mosaic spread"),
    _h(("-mosaic_dom", "-mosaic_domains"), _sub("-mosaic_dom"), _COUNT,
       lambda v: {"mosaic_domains": v[0]}, "mosaic domains"),
    _h("-mosaic_quadrature", _exact("-mosaic_quadrature"), _OFF, lambda v: {"mosaic_quadrature": True},
       "deterministic Gaussian mosaic domains, smooth in the spread (nbfunc)", nbfunc=True),
    _h("-eta", _exact("-eta"), Numbers(3, "3 angles in degrees (xx yy zz)", nonnegative=True, meta="xx yy zz"),
       lambda v: {"eta": tuple(v)}, "anisotropic mosaic spread about lab x, y, z (nbfunc)", nbfunc=True),
    _h("-eta_tensor", _exact("-eta_tensor"),
       Numbers(6, "6 angles in degrees (xx yy zz xy yz xz)", meta="xx yy zz xy yz xz"),
       lambda v: {"eta": tuple(v)}, "anisotropic mosaic spread tensor, lab frame (nbfunc)", nbfunc=True),
    _h("-dispersion", _sub("-dispersion"), _at_least_zero("a spectral width in percent", "%"),
       lambda v: {"dispersion": v[0] / 100.0}, "spectral width"),
    _h("-dispsteps", _sub("-dispsteps"), _COUNT, lambda v: {"dispsteps": v[0]}, "wavelength steps"),
    _h("-bandwidth", _exact("-bandwidth"), _at_least_zero("a FWHM in percent", "%"),
       lambda v: {"bandwidth": v[0] / 100.0}, "Gaussian spectrum's full width at half maximum (nbfunc)",
       nbfunc=True),
    _h("-bandwidth_steps", _exact("-bandwidth_steps"), Numbers(1, "a channel count", integer=True,
                                                               positive=True, meta="int"),
       lambda v: {"bandwidth_steps": v[0]}, "channels of -bandwidth, default 7 (nbfunc)", nbfunc=True),
    _h("-divergence", _sub("-divergence"), _RANGE,
       lambda v: {"hdivrange": v[0] / 1000.0, "vdivrange": v[0] / 1000.0}, "divergence range, h and v"),
    _h("-hdivrange", _sub("-hdivrange"), _RANGE, lambda v: {"hdivrange": v[0] / 1000.0}, "horizontal range"),
    _h("-vdivrange", _sub("-vdivrange"), _RANGE, lambda v: {"vdivrange": v[0] / 1000.0}, "vertical range"),
    _h("-hdivstep", _sub_len("-hdivstep", 9), _RANGE, lambda v: {"hdivstep": v[0] / 1000.0}, "horizontal step"),
    _h("-hdivsteps", _sub("-hdivsteps"), _COUNT, lambda v: {"hdivsteps": v[0]}, "horizontal steps"),
    _h("-vdivstep", _sub_len("-vdivstep", 9), _RANGE, lambda v: {"vdivstep": v[0] / 1000.0}, "vertical step"),
    _h("-vdivsteps", _sub("-vdivsteps"), _COUNT, lambda v: {"vdivsteps": v[0]}, "vertical steps"),
    _h("-divsteps", _sub("-divsteps"), _COUNT, lambda v: {"hdivsteps": v[0], "vdivsteps": v[0]},
       "divergence steps, h and v"),
    _h("-round_div", _sub("-round_div"), _OFF, lambda v: {"round_div": True}, "elliptical divergence"),
    _h("-square_div", _sub("-square_div"), _OFF, lambda v: {"round_div": False}, "rectangular divergence"),
    _h("-adc", _sub("-adc"), Numbers(1, "an offset in counts", meta="counts"),
       lambda v: {"adc_offset": v[0]}, "ADC offset"),
    # spindle
    _h("-phi", _sub_len("-phi", 4), _DEG, lambda v: {"phi0": v[0] / RTD}, "starting phi"),
    _h("-osc", _sub("-osc"), _SPREAD, lambda v: {"osc": v[0] / RTD}, "oscillation range"),
    _h("-phistep", _sub_len("-phistep", 8), _SPREAD, lambda v: {"phistep": v[0] / RTD}, "phi step"),
    _h("-phisteps", _sub("-phisteps"), _COUNT, lambda v: {"phisteps": v[0]}, "phi steps"),
    _h("-dmin", _sub("-dmin"), _at_least_zero("a resolution in Angstrom", "A"), lambda v: {"dmin": v[0] * 1e-10},
       "resolution cutoff"),
    # input files
    _h("-mat", _sub("-mat"), _FILE, lambda v: {"mat_file": v[0]}, "MOSFLM orientation matrix"),
    _h("-hkl", _sub("-hkl"), _FILE, lambda v: {"hkl_file": v[0]}, "structure factors"),
    _h("-default_F", _sub("-default_F"), _NUM, lambda v: {"default_F": v[0]}, "F of unlisted reflections"),
    _h("-img", _sub("-img"), _FILE, lambda v: {"img_file": v[0]}, "SMV header to start from"),
    _h("-stolout", lambda t: "-stolout" in t and len(t) > 7, _FILE, lambda v: {"stolout_file": v[0]},
       "unused by nanoBragg"),
    _h("-stol", _sub_len("-stol", 5), _FILE, lambda v: {"stol_file": v[0], "stol_file_mult": 1e10},
       "F(sin(theta)/lambda) table (unused)"),
    _h("-4stol", _sub_len("-4stol", 6), _FILE, lambda v: {"stol_file": v[0], "stol_file_mult": 1e10 / 4},
       "F(4 sin(theta)/lambda) table (unused)"),
    _h("-Q", _sub_len("-Q", 2), _FILE, lambda v: {"stol_file": v[0], "stol_file_mult": 1e10 / math.pi / 4},
       "F(Q) table (unused)"),
    _h("-sourcefile", _sub("-sourcefile"), _FILE, lambda v: {"source_file": v[0]}, "list of sources"),
    _h("-spectrum", _exact("-spectrum"), _FILE, lambda v: {"spectrum_file": v[0]},
       "spectrum file (.lam: wavelength,weight per line) (nbfunc)", nbfunc=True),
    # output files
    _h(("-floatfile", "-floatimage"), _sub("-floatfile", "-floatimage"), _FILE,
       lambda v: {"float_file": v[0], "float_file_given": True}, "raw float32 image"),
    _h(("-intfile", "-intimage"), _sub("-intfile", "-intimage"), _FILE,
       lambda v: {"int_file": v[0], "int_file_given": True}, "noiseless SMV image"),
    _h(("-pgmfile", "-pgmimage"), _sub("-pgmfile", "-pgmimage"), _FILE,
       lambda v: {"pgm_file": v[0], "pgm_file_given": True, "write_pgm": True}, "8-bit PGM image"),
    _h(("-noisefile", "-noiseimage"), _sub("-noisefile", "-noiseimage"), _FILE,
       lambda v: {"noise_file": v[0], "noise_file_given": True, "calculate_noise": True}, "noisy SMV image"),
    _h("-nonoise", _sub("-nonoise"), _OFF, lambda v: {"calculate_noise": False}, "no noise image"),
    _h("-nopgm", _sub("-nopgm"), _OFF, lambda v: {"write_pgm": False}, "no PGM image"),
    _h("-scale", _sub("-scale"), _NUM, lambda v: {"intfile_scale": v[0]}, "SMV scale (<= 0: auto)"),
    _h("-pgmscale", _sub("-pgmscale"), _NUM, lambda v: {"pgm_scale": v[0], "write_pgm": True}, "PGM scale"),
    _h("-coherent", _sub("-coherent"), _OFF, lambda v: {"coherent": True}, "add amplitudes of sources"),
    _h("-printout", _sub("-printout"), _OFF, lambda v: {"printout": True}, "print pixel values"),
    _h("-noprogress", _sub("-noprogress"), _OFF, lambda v: {"progress_meter": False}, "no progress meter"),
    _h("-progress", _sub("-progress"), _OFF, lambda v: {"progress_meter": True}, "progress meter"),
    _h("-interpolate", _sub("-interpolate"), _OFF, lambda v: {"interpolate": 1}, "tricubic F interpolation"),
    _h("-nointerpolate", _sub("-nointerpolate"), _OFF, lambda v: {"interpolate": 0}, "nearest F"),
    _h("-round_xtal", _sub("-round_xtal"), _OFF, lambda v: {"xtal_shape": "ROUND"}, "ellipsoidal crystal"),
    _h("-square_xtal", _sub("-square_xtal"), _OFF, lambda v: {"xtal_shape": "SQUARE"}, "parallelepiped crystal"),
    _h("-gauss_xtal", _sub("-gauss_xtal"), _OFF, lambda v: {"xtal_shape": "GAUSS"}, "Gaussian spots"),
    _h("-gauss_hkl_xtal", _exact("-gauss_hkl_xtal"), _OFF, lambda v: {"xtal_shape": "GAUSS_HKL"},
       "diffBragg's Gaussian spots, offsets in Miller units (nbfunc)", nbfunc=True),
    _h(("-tophat_spots", "-binary_spots"), _sub("-binary_spots", "-tophat_spots"), _OFF,
       lambda v: {"xtal_shape": "TOPHAT"}, "top-hat spots"),
    _h("-fudge", _sub("-fudge"), Numbers(1, "a number", positive=True, meta="number"), lambda v: {"fudge": v[0]}, "spot-shape scale"),
    _h("-printout_pixel", _sub("-printout_pixel"),
       Numbers(2, "2 pixel indices (fast slow)", integer=True, meta="fast slow"),
       lambda v: {"printout_pixel": (v[0], v[1])}, "print only this pixel"),
    # random seeds, stored as C's negative idum
    _h("-seed", _sub("-seed"), _SEED, lambda v: {"seed": -v[0]}, "noise seed"),
    _h("-mosaic_seed", _sub("-mosaic_seed"), _SEED, lambda v: {"mosaic_seed": -v[0]}, "mosaic seed"),
    _h("-misset_seed", _sub("-misset_seed"), _SEED, lambda v: {"misset_seed": -v[0]}, "random misset seed"),
    _h("-water", _sub("-water"), _at_least_zero("a size in um", "um"), lambda v: {"water_size": v[0] / 1e6},
       "water background thickness"),
    # C's first loop only
    _h("-mask", _sub("-mask"), _FILE, lambda v: {"mask_file": v[0]}, "SMV mask (0 skips a pixel)"),
    # nbfunc extensions, exact names
    _h("-dtype", _exact("-dtype"),
       Text("'float32' or 'float64'", lambda s: s in ("float32", "float64"), meta="float32|float64"),
       lambda v: {"dtype": v[0]}, "floating-point precision (nbfunc)", nbfunc=True),
    _h("-chunk", _exact("-chunk"),
       Numbers(1, "a pixel count (0 = automatic)", integer=True, nonnegative=True, meta="int"),
       lambda v: {"chunk": v[0]}, "evaluations per chunk, 0 automatic (nbfunc)", nbfunc=True),
    _h("-device", _exact("-device"), Text("a torch device such as 'cpu' or 'cuda:0'", _DEVICE.fullmatch, meta="device"),
       lambda v: {"device": v[0]}, "torch device (nbfunc)", nbfunc=True),
    _h("-cbffile", _exact("-cbffile"), _FILE, lambda v: {"cbf_file": v[0]},
       "miniCBF image: photons rounded to counts, Pilatus header (nbfunc)", nbfunc=True),
    _h("-nxsfile", _exact("-nxsfile"), _FILE, lambda v: {"nxs_file": v[0]},
       "NXmx HDF5 image with its geometry, for DIALS (nbfunc)", nbfunc=True),
    _h("-nxs_compression", _exact("-nxs_compression"),
       Text("'none', 'gzip' or 'bslz4'", lambda s: s in ("none", "gzip", "bslz4"), meta="none|gzip|bslz4"),
       lambda v: {"nxs_compression": None if v[0] == "none" else v[0]},
       "compression of the -nxsfile image (nbfunc)", nbfunc=True),
    _h("-params_out", _exact("-params_out"), _FILE, lambda v: {"params_out": v[0]},
       "the run's parameter tree as JSON, for nbfunc.Params.load (nbfunc)", nbfunc=True),
    _h("-params", _exact("-params"), _FILE, lambda v: {"params_in": v[0]},
       "render a parameter tree saved by -params_out or Params.save (nbfunc)", nbfunc=True),
)


def known_flags() -> tuple[str, ...]:
    """Every documented spelling, in handler order (used for suggestions)."""
    seen: dict[str, None] = {}
    for h in HANDLERS:
        seen.update(dict.fromkeys(h.names))
    return tuple(seen)


def triggered(token: str) -> tuple[Handler, ...]:
    """The handlers nanoBragg would run for `token`, in order, before any C ``continue``."""
    return tuple(h for h in HANDLERS if h.match(token))


def usage() -> str:
    """One line per handler: spellings, values and what it sets."""
    lines = []
    for h in HANDLERS:
        flag = " | ".join(h.names)
        vals = h.values.usage()
        lines.append(f"  {flag} {'<' + vals + '>' if vals else ''}".rstrip().ljust(52) + f" {h.help}")
    return "\n".join(["usage: nbfunc [flags]   (docs/cli.md describes every flag)", *lines])


# ----------------------------------------------------------------------------------------------
# scanning: which arguments are flags, which handlers they trigger, which values they read

_C_READ = "<read as C does>"  # marks a secondary handler: its values are read later, as C reads them


@dataclass(frozen=True)
class _Hit:
    index: int
    token: str
    handlers: tuple[Handler, ...]
    reads: tuple  # per handler: strictly read values, None (C guard fails), or _C_READ
    consumed: int
    documented: bool


def _documented(token: str, h: Handler) -> bool:
    return token in h.names or (token.startswith("--") and token[1:] in h.names)


def _label(token: str, h: Handler) -> str:
    return token if _documented(token, h) else f"{token} (read by nanoBragg as {h.name})"


# names that look like flags in nanoBragg's comments and examples but match no handler
_SUGGEST = {
    "-hdiv": "-hdivrange",
    "-vdiv": "-vdivrange",
    "-dispstep": "-dispsteps",
    "-trace_pixel": "-printout_pixel",
    "-dump_pixel": "-printout_pixel",
}


def _unknown(argv: Sequence[str], i: int, last: _Hit | None) -> FlagError:
    tok = argv[i]
    if _looks_numeric(tok) or not tok.startswith("-"):
        if last is None:
            return FlagError(f"unexpected argument {tok!r}: expected a flag name such as -distance")
        extra = ""
        if last.handlers[0].name == "-cell" and tok.startswith("-"):
            extra = "; -cell stops reading values at an argument that starts with '-'"
        n = last.consumed
        return FlagError(
            f"unexpected argument {tok!r} after {last.token}, which takes {n} value{'s' if n != 1 else ''}{extra}"
        )
    close = [_SUGGEST[tok]] if tok in _SUGGEST else difflib.get_close_matches(tok, known_flags(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return FlagError(f"unknown flag {tok!r}{hint} (docs/cli.md lists every flag)")


def _scan_one(argv: Sequence[str], i: int) -> _Hit | None:
    tok = argv[i]
    if not tok.startswith("-"):
        return None
    handlers = triggered(tok)
    if not handlers:
        return None
    documented = any(_documented(tok, h) for h in handlers)
    rest = argv[i + 1:]
    reads = tuple(
        h.values.strict(_label(tok, h), rest) if (_documented(tok, h) or not documented) else _C_READ
        for h in handlers
    )
    consumed = max((len(r) for r in reads if r is not None and r is not _C_READ), default=0)
    return _Hit(i, tok, handlers, reads, consumed, documented)


def _scan(argv: Sequence[str]) -> list[_Hit]:
    """Split argv into flags and their values; raise FlagError for anything nanoBragg would ignore."""
    if any(a in HELP_FLAGS for a in argv):
        raise HelpRequested()
    if any(a in VERSION_FLAGS for a in argv):
        raise VersionRequested()
    hits: list[_Hit] = []
    i = 0
    while i < len(argv):
        hit = _scan_one(argv, i)
        if hit is None:
            raise _unknown(argv, i, hits[-1] if hits else None)
        hits.append(hit)
        i += 1 + hit.consumed
    return hits


# ----------------------------------------------------------------------------------------------
# applying handlers


@dataclass(frozen=True)
class _Event:
    """One handler that ran (values) or was skipped by its C argc guard (values None)."""

    hit: _Hit
    handler: Handler
    values: tuple | None
    secondary: bool


def _run_hit(cf: CFlags, hit: _Hit, argv: Sequence[str]) -> tuple[CFlags, list[_Event]]:
    events = []
    for h, read in zip(hit.handlers, hit.reads):
        secondary = read is _C_READ
        values = h.values.c_read(argv[hit.index + 1:]) if secondary else read
        events.append(_Event(hit, h, values, secondary))
        if values is None:
            continue
        cf = replace(cf, **h.apply(values))
        if h.stops(values):
            break
    return cf, events


def given_flags(argv: Sequence[str]) -> dict[str, str]:
    """Handler name -> the argument that ran it, for every handler the command line runs by
    its own name or as nanoBragg's substring match (later arguments win).

    Raises FlagError/HelpRequested/VersionRequested for the command lines `parse_flags` refuses.

    >>> given_flags(["-N", "5", "-pixels", "0.1"])
    {'-N': '-N', '-pixel': '-pixels'}
    """
    return {h.name: hit.token for hit in _scan(list(argv))
            for h, read in zip(hit.handlers, hit.reads) if read is not _C_READ}


def find_header_files(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """C's first argument loop: the (-img, -mask) file names, the last of each, or None.

    Raises FlagError/HelpRequested for the same command lines `parse_flags` refuses.
    """
    img = mask = None
    for hit in _scan(list(argv)):
        if "-img" in hit.token:
            img = argv[hit.index + 1]
        if "-mask" in hit.token:
            mask = argv[hit.index + 1]
    return img, mask


def parse_flags(argv: Sequence[str], start: CFlags | None = None) -> CFlags:
    """Apply nanoBragg's argument loop to `start` (default: C's defaults); return a new CFlags.

    argv: the arguments after the program name. `start` is typically pre-filled from the -img
    and -mask headers; flags override it, as in C. Warnings about flags nanoBragg ignores or
    overrides are appended to the returned `CFlags.warnings`.

    >>> parse_flags(["-distance", "120", "-detector_roty", "-5"]).distance
    0.12
    """
    argv = list(argv)
    cf = copy.deepcopy(start) if start is not None else CFlags()
    events: list[_Event] = []
    for hit in _scan(argv):
        cf, new = _run_hit(cf, hit, argv)
        events.extend(new)
    return replace(cf, warnings=[*cf.warnings, *_warnings(events, cf)])


# ----------------------------------------------------------------------------------------------
# warnings: flags nanoBragg accepts but ignores or overrides


def _ran(events: list[_Event], *names: str) -> list[_Event]:
    return [e for e in events if e.handler.name in names and e.values is not None]


def _fmt(values: tuple) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _flag_list(events: list[_Event]) -> str:
    return "/".join(dict.fromkeys(e.hit.token for e in events))


def _w_spelling(events: list[_Event], cf: CFlags) -> list[str]:
    out = []
    for hit in dict.fromkeys(e.hit for e in events if not e.hit.documented):
        names = ", ".join(e.handler.name for e in events if e.hit is hit and e.values is not None)
        out.append(
            f"{hit.token!r} is not a nanoBragg flag name; nanoBragg matches by substring and reads it as {names}"
        )
    return out


def _w_secondary(events: list[_Event], cf: CFlags) -> list[str]:
    out = []
    last_misset = (_ran(events, "-misset") or [None])[-1]
    if last_misset is not None and last_misset.secondary:
        e = last_misset
        out.append(
            f"{e.hit.token} also sets the crystal misset to '{_fmt(e.values)}' (deg): nanoBragg reads '-misset' inside"
            f" the flag name and takes the next arguments; give -misset after it to set the orientation"
        )
    last_twotheta = (_ran(events, "-twotheta") or [None])[-1]
    if last_twotheta is not None and last_twotheta.secondary:
        e = last_twotheta
        out.append(
            f"{e.hit.token} also sets the two-theta angle to {_fmt(e.values)} deg and the pivot to SAMPLE: nanoBragg"
            f" reads '-twotheta' inside the flag name; give -twotheta after {e.hit.token} to set the angle"
        )
    for e in events:
        if e.secondary and e.values is not None and e.handler.name not in ("-misset", "-twotheta", "-printout"):
            out.append(f"{e.hit.token} also runs nanoBragg's {e.handler.name} handler (substring match)")
    return out


def _w_pivot(events: list[_Event], cf: CFlags) -> list[str]:
    given = [e for e in _ran(events, "-pivot") if not e.secondary]
    if not given:
        return []
    last = given[-1]
    wanted = _pivot(last.values).get("detector_pivot")
    conv = cf.beam_convention
    if conv != "CUSTOM":
        forced = "BEAM" if conv in BEAM_PIVOT_CONVENTIONS else "SAMPLE"
        if wanted != forced:
            return [
                f"-pivot {last.values[0]} has no effect: the {conv} convention always uses the {forced} pivot"
                f" (-pivot only matters with custom vectors, i.e. the CUSTOM convention)"
            ]
        return []
    later = [
        e for e in events
        if e.hit.index > last.hit.index and e.values is not None and "detector_pivot" in e.handler.apply(e.values)
    ]
    if later and cf.detector_pivot != wanted:
        return [
            f"-pivot {last.values[0]} is overridden by the later {later[-1].hit.token}, which sets the"
            f" {cf.detector_pivot} pivot; put -pivot after it"
        ]
    return []


def _w_geometry(events: list[_Event], cf: CFlags) -> list[str]:
    out, conv = [], cf.beam_convention
    pix0 = _ran(events, "-pix0_vector")
    if pix0:
        out.append(
            f"-pix0_vector {_fmt(pix0[-1].values)}: nanoBragg only uses this flag to switch to the CUSTOM"
            f" convention; the detector origin is recomputed from the beam centre, distance and pivot"
        )
    beam = _ran(events, "-Xbeam", "-Ybeam")
    if beam and conv in SAMPLE_PIVOT_CONVENTIONS:
        out.append(f"{_flag_list(beam)} has no effect under the {conv} convention; use -ORGX/-ORGY")
    close = _ran(events, "-Xclose", "-Yclose")
    if close and conv != "CUSTOM":
        out.append(f"{_flag_list(close)} has no effect under the {conv} convention (only CUSTOM uses it)")
    org = _ran(events, "-ORGX", "-ORGY")
    if org and conv in BEAM_PIVOT_CONVENTIONS:
        out.append(f"{_flag_list(org)} has no effect under the {conv} convention; use -Xbeam/-Ybeam")
    vectors = _ran(events, "-fdet_vector", "-sdet_vector", "-odet_vector", "-beam_vector", "-polar_vector",
                   "-spindle_axis", "-twotheta_axis")
    if vectors and conv != "CUSTOM":
        out.append(f"{_flag_list(vectors)} replaced by the {conv} convention's vectors (a named convention given"
                   f" later resets every vector)")
    return out


def _w_ignored(events: list[_Event], cf: CFlags) -> list[str]:
    out = []
    for e in events:
        if e.handler.name == "-curved_det" and e.values is None and not e.secondary:
            out.append(f"{e.hit.token} is ignored: nanoBragg only honours it when another argument follows it")
    for e in _ran(events, "-stol", "-4stol", "-Q"):
        out.append(f"{e.hit.token} {e.values[0]}: nanoBragg reads this file but does not use it")
    for e in _ran(events, "-stolout"):
        out.append(f"{e.hit.token} {e.values[0]}: nanoBragg never writes this file")
    return out


def _w_toggles(events: list[_Event], cf: CFlags) -> list[str]:
    out = []
    if _ran(events, "-nonoise") and _ran(events, "-noisefile"):
        state = "written" if cf.calculate_noise else "not written"
        out.append(f"-nonoise and -noisefile both given; the last one wins: the noise image is {state}")
    if _ran(events, "-nopgm") and _ran(events, "-pgmfile", "-pgmscale"):
        state = "written" if cf.write_pgm else "not written"
        out.append(f"-nopgm and -pgmfile/-pgmscale both given; the last one wins: the PGM image is {state}")
    if _ran(events, "-nopolar") and _ran(events, "-polar"):
        state = "off" if cf.nopolar else "on"
        out.append(f"-nopolar and -polar both given; the last one wins: the polarization factor is {state}")
    return out


_WARNING_RULES = (_w_spelling, _w_secondary, _w_pivot, _w_geometry, _w_ignored, _w_toggles)


def _warnings(events: list[_Event], cf: CFlags) -> list[str]:
    """One line per ignored or overridden flag, in a fixed order, without repeats."""
    lines = [line for rule in _WARNING_RULES for line in rule(events, cf)]
    return list(dict.fromkeys(lines))
