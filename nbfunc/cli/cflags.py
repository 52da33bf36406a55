"""The C program's command-line variables, before any derivation.

`CFlags` holds every variable that nanoBragg's argument loops write, with the C program's own
default values and in the C program's internal units (metres, radians, photons/m^2), so that the
derivation in `nbfunc.cli.derive` can follow the C program line by line. Sentinels follow C:
``NaN`` means "not given" for beam-centre style values and ``-1`` for counts and ranges that the
C program auto-selects. This record never reaches the physics: `params_from_args` turns it into
a validated `nbfunc.Params`, whose builders (`nbfunc.cli.derive`) convert each value once into
the tree's units (mm, Angstrom, deg); after the derivation only the output and run-control
fields are read (file names, scales, seeds, device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

NAN = math.nan
RTD = 180.0 / math.pi

CONVENTIONS = ("MOSFLM", "XDS", "ADXV", "DENZO", "DIALS", "CUSTOM")
PIVOTS = ("BEAM", "SAMPLE")
SHAPES = ("SQUARE", "ROUND", "GAUSS", "GAUSS_HKL", "TOPHAT")


@dataclass
class CFlags:
    """C variables after the argument loops (C names, C units: m, rad, photons/m^2)."""

    # files
    img_file: str | None = None
    mask_file: str | None = None
    mat_file: str | None = None
    hkl_file: str | None = None
    source_file: str | None = None
    stol_file: str | None = None
    stol_file_mult: float = 1.0e10
    stolout_file: str = "output.stol"
    float_file: str = "floatimage.bin"
    int_file: str = "intimage.img"
    pgm_file: str = "image.pgm"
    noise_file: str = "noiseimage.img"
    dump_file: str = "Fdump.bin"
    # which output flags were given explicitly (the C program writes every output by default)
    float_file_given: bool = False
    int_file_given: bool = False
    pgm_file_given: bool = False
    noise_file_given: bool = False

    # crystal
    Na: float = 1.0
    Nb: float = 1.0
    Nc: float = 1.0
    user_cell: bool = False
    cell_a: float = 0.0  # Angstrom (C: a[0])
    cell_b: float = 0.0
    cell_c: float = 0.0
    alpha: float = 0.0  # rad
    beta: float = 0.0
    gamma: float = 0.0
    misset_mode: float = 0.0  # C misset[0]: 0 none, 1 angles, -1 random
    misset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # rad, C misset[1..3]
    sample_x: float = 0.0  # m
    sample_y: float = 0.0
    sample_z: float = 0.0
    density: float = 1.0e6  # g/m^3
    molecular_weight: float = 18.0
    xtal_shape: str = "SQUARE"
    fudge: float = 1.0
    Ncells_def: tuple[float, float, float] = (0.0, 0.0, 0.0)  # cells (-Ndef, nbfunc)
    G: float = 1.0  # per-shot scale of the crystal's photons (-G, nbfunc)
    diffuse: bool = False  # -diffuse: diffBragg's diffuse scattering (nbfunc)
    diffuse_gamma: tuple = ()  # -diffuse_gamma: Angstrom, 1 or 3 values (nbfunc); () not given
    diffuse_sigma: tuple = ()  # -diffuse_sigma: Angstrom, 1 or 3 values (nbfunc); () not given
    laue_group: str | None = None  # -laue_group: the diffuse term's Laue group symbol (nbfunc)
    bfactor: float = -1.0  # -bfactor: B in Angstrom^2 (nbfunc); -1 not given
    default_F: float = 0.0
    interpolate: int = 2  # 2 auto, 1 on, 0 off
    mosaic_spread: float = -1.0  # rad
    mosaic_domains: int = -1
    mosaic_seed: int = -12345678
    mosaic_quadrature: bool = False  # nbfunc: deterministic Gaussian domains
    eta: tuple = ()  # nbfunc: deg, 3 axis spreads or 6 tensor terms; () not given
    misset_seed: int | None = None  # None: same as seed (C: misset_seed = seed)

    # beam
    lambda0: float = 1.0e-10  # m
    dispersion: float = 0.0  # fraction (C divides percent by 100)
    dispstep: float = -1.0
    dispsteps: int = -1
    spectrum_file: str | None = None  # -spectrum: a .lam file of channels (nbfunc)
    bandwidth: float = -1.0  # -bandwidth: Gaussian FWHM as a fraction (nbfunc); -1 not given
    bandwidth_steps: int = -1  # -bandwidth_steps: channels of -bandwidth (nbfunc); -1 default
    hdivrange: float = -1.0  # rad
    vdivrange: float = -1.0
    hdivstep: float = -1.0
    vdivstep: float = -1.0
    hdivsteps: int = -1
    vdivsteps: int = -1
    round_div: bool = True
    fluence: float = 125932015286227086360700780544.0  # photons/m^2
    flux: float = 0.0  # photons/s
    exposure: float = 1.0  # s
    beamsize: float = 1.0e-4  # m
    polarization: float = 0.0  # Kahn factor
    nopolar: bool = False
    coherent: bool = False
    water_size: float = 0.0  # m

    # detector
    pixel_size: float = 0.1e-3  # m
    fpixels: int = 0
    spixels: int = 0
    detsize_f: float = 102.4e-3  # m
    detsize_s: float = 102.4e-3
    distance: float = 100.0e-3  # m
    close_distance: float = NAN  # m
    detector_mu: float = -1.0  # 1/m
    detector_thick: float = 0.0  # m
    detector_thickstep: float = -1.0
    detector_thicksteps: int = -1
    detector_rotx: float = 0.0  # rad
    detector_roty: float = 0.0
    detector_rotz: float = 0.0
    detector_twotheta: float = 0.0  # rad
    twotheta: float = NAN  # rad; the C variable the -img/-mask TWOTHETA header writes (unused)
    beam_vector: tuple[float, float, float] = (1.0, 0.0, 0.0)  # C {0,1,0,0}: index 0 unused
    fdet_vector: tuple[float, float, float] = (0.0, 0.0, 1.0)
    sdet_vector: tuple[float, float, float] = (0.0, -1.0, 0.0)
    odet_vector: tuple[float, float, float] = (1.0, 0.0, 0.0)
    polar_vector: tuple[float, float, float] = (0.0, 0.0, 1.0)
    spindle_vector: tuple[float, float, float] = (0.0, 0.0, 1.0)
    twotheta_axis: tuple[float, float, float] = (0.0, 1.0, 0.0)  # C {0,0,1,0}
    pix0_vector: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pix0_given: bool = False  # C pix0_vector[0] = 1
    detector_pivot: str = "BEAM"
    beam_convention: str = "MOSFLM"
    curved_detector: bool = False
    point_pixel: bool = False
    Xbeam: float = NAN  # m
    Ybeam: float = NAN
    Xclose: float = NAN
    Yclose: float = NAN
    ORGX: float = NAN  # pixels
    ORGY: float = NAN
    adc_offset: float = 40.0

    # sampling
    roi: tuple[int, int, int, int] = (-1, -1, -1, -1)  # xmin xmax ymin ymax (C inclusive)
    oversample: int = -1
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False
    phi0: float = 0.0  # rad
    osc: float = -1.0  # rad
    phistep: float = -1.0  # rad
    phisteps: int = -1
    dmin: float = 0.0  # m

    # output and run control
    intfile_scale: float = 0.0
    pgm_scale: float = 0.0
    write_pgm: bool = True
    calculate_noise: bool = True
    seed: int | None = None  # None: the clock, as C's seed = -time(0)
    progress_meter: bool = True
    printout: bool = False
    printout_pixel: tuple[int, int] = (-1, -1)  # fpixel, spixel

    # nbfunc extensions (not nanoBragg flags): -dtype, -chunk, -device, -cbffile, -nxsfile,
    # -params_out, -params
    dtype: str = "float64"  # "float32" or "float64"
    chunk: int = 0  # pixels per evaluation chunk; 0 = automatic
    device: str = "cpu"  # torch device string
    cbf_file: str | None = None  # -cbffile: miniCBF of the photons rounded to counts
    nxs_file: str | None = None  # -nxsfile: NXmx HDF5 of the float image with its geometry
    nxs_compression: str | None = None  # -nxs_compression: None, "gzip" or "bslz4"
    params_out: str | None = None  # -params_out: the parameter tree as JSON (Params.save)
    params_in: str | None = None  # -params: render this saved tree instead of deriving one

    warnings: list[str] = field(default_factory=list)
