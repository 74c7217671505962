"""Radiograph simulation with physics the pipeline does not use.

The pipeline models a radiograph as a monochromatic line integral of density. The demo's radiographs
are made differently, so that learning and registration face a realistic gap:

* a polychromatic tungsten spectrum (Kramers' law, aluminium filtration), energy-integrating detector;
* energy-dependent mass attenuation of hydroxyapatite (bone mineral), water-like soft tissue and fat,
  so bone contrast and beam hardening differ from soft tissue's;
* scatter (a wide kernel on the primary, scaled by a scatter-to-primary ratio), quantum (Poisson)
  noise, detector blur;
* log transform, an unknown exposure and window, a tone curve and unsharp masking as a DX
  workstation's processing does (``presentation="processed"``, a "for presentation" image), or the
  detector's log signal on a fixed scale (``"raw"``, a "for processing" image: :data:`RAW_PER_NEPER`).

Mass attenuation coefficients (cm2/g) are approximate values after NIST XCOM (within a few percent);
hydroxyapatite is the mass-weighted mixture of Ca, P and O.

Example:
    >>> import numpy as np
    >>> e, w = spectrum(80.0, al_mm=2.5)
    >>> bool(w.sum() > 0.999) and bool(e.max() < 80)
    True
    >>> bool(mass_attenuation("mineral", 40.0) > 3 * mass_attenuation("water", 40.0))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

_ENERGIES_KEV = np.array([15, 20, 30, 40, 50, 60, 80, 100, 150], float)
_MU_RHO = {  # cm2/g
    "water": [1.673, 0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505],
    "fat": [1.16, 0.5621, 0.3011, 0.2353, 0.2079, 0.1929, 0.1740, 0.1618, 0.1434],
    "mineral": [18.5, 6.37, 2.09, 0.99, 0.58, 0.397, 0.256, 0.198, 0.148],  # hydroxyapatite
    "aluminium": [7.955, 3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378],
}
AL_DENSITY = 2.699  # g/cm3
MATERIALS = ("mineral", "water", "fat")
#: Stored units of a raw ("for processing") radiograph per neper of attenuation (-ln of the detector
#: signal relative to the unattenuated beam): 1000 per decade of exposure, a common detector log scale.
RAW_PER_NEPER = 1000.0 / np.log(10.0)
#: Stored value of a raw radiograph where nothing attenuates (so that air, which scatter can make a
#: little brighter than the open beam, is not 0, the padding's value).
RAW_OPEN_BEAM = 1000.0
#: The full scale of the simulated images' 0..1 (16-bit files store 0..1 as 0..65535).
FULL_SCALE = 65535.0
PRESENTATIONS = ("processed", "raw")


def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """Mass attenuation coefficient (cm2/g), log-log interpolated."""
    return np.exp(np.interp(np.log(energy_kev), np.log(_ENERGIES_KEV), np.log(_MU_RHO[material])))


def spectrum(kvp: float, al_mm: float, step_kev: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Energy bins (keV) and detected-energy weights (sum 1) of a filtered tungsten spectrum.

    Photon fluence per keV follows Kramers' law, (kVp - E) / E, attenuated by ``al_mm`` of aluminium;
    the weights are fluence x energy, as an energy-integrating detector records it.
    """
    e = np.arange(15.0, kvp, step_kev) + step_kev / 2
    fluence = (kvp - e) / e * np.exp(-mass_attenuation("aluminium", e) * AL_DENSITY * al_mm / 10)
    w = fluence * e
    return e, w / w.sum()


@dataclass(frozen=True)
class XrayExposure:
    """The random acquisition and processing of one radiograph (all of it recorded in truth.json).

    Args:
        kvp: Tube voltage.
        al_mm: Total aluminium filtration.
        photons_per_pixel: Unattenuated quanta per pixel (sets the quantum noise).
        scatter_to_primary: Mean scatter-to-primary ratio behind the patient (with a grid).
        scatter_sigma_mm: Width of the scatter kernel at the detector.
        blur_px: Detector blur (Gaussian sigma, pixels).
        window_low_pct, window_high_pct: Percentiles of the log image mapped to black and white.
        gamma: Tone curve exponent.
        unsharp_amount: Unsharp-masking gain (edge enhancement).
        unsharp_sigma_mm: Unsharp-masking kernel width.
    """

    kvp: float = 80.0
    al_mm: float = 2.5
    photons_per_pixel: float = 1e4
    scatter_to_primary: float = 0.4
    scatter_sigma_mm: float = 40.0
    blur_px: float = 0.7
    window_low_pct: float = 1.0
    window_high_pct: float = 99.5
    gamma: float = 1.0
    unsharp_amount: float = 0.4
    unsharp_sigma_mm: float = 12.0

    @classmethod
    def random(cls, rng: np.random.Generator) -> "XrayExposure":
        return cls(
            kvp=float(rng.choice([70.0, 75.0, 80.0, 85.0])), al_mm=float(rng.uniform(2.5, 4.0)),
            photons_per_pixel=float(10 ** rng.uniform(4.5, 5.2)),
            scatter_to_primary=float(rng.uniform(0.2, 0.6)), scatter_sigma_mm=float(rng.uniform(30, 60)),
            blur_px=float(rng.uniform(0.5, 1.1)), window_low_pct=float(rng.uniform(0.2, 3.0)),
            window_high_pct=float(rng.uniform(99.0, 99.9)), gamma=float(rng.uniform(0.75, 1.3)),
            unsharp_amount=float(rng.uniform(0.0, 0.8)), unsharp_sigma_mm=float(rng.uniform(8, 20)),
        )

    def repeat(self, rng: np.random.Generator) -> "XrayExposure":
        """Another radiograph of the same patient on the same device and exam protocol: the tube voltage,
        filtration, detector and the workstation's processing stay; the dose (the automatic exposure
        control's, within about +-25 %) and the scatter (the patient's position, +-10 %) change.

        Example:
            >>> first = XrayExposure.random(np.random.default_rng(0))
            >>> again = first.repeat(np.random.default_rng(1))
            >>> (again.kvp, again.gamma, again.unsharp_amount) == (first.kvp, first.gamma, first.unsharp_amount)
            True
            >>> again.photons_per_pixel != first.photons_per_pixel
            True
        """
        return replace(self, photons_per_pixel=self.photons_per_pixel * float(10 ** rng.uniform(-0.1, 0.1)),
                       scatter_to_primary=self.scatter_to_primary * float(rng.uniform(0.9, 1.1)))


def primary_transmission(areal: dict[str, np.ndarray], kvp: float, al_mm: float) -> np.ndarray:
    """Energy-weighted primary transmission (0..1) through areal densities of each material (g/cm2)."""
    energies, weights = spectrum(kvp, al_mm)
    out = np.zeros_like(areal["water"], dtype=np.float64)
    for e, w in zip(energies, weights):
        exponent = sum(mass_attenuation(m, e) * areal[m] for m in MATERIALS)
        out += w * np.exp(-exponent)
    return out


def detector_log_image(areal: dict[str, np.ndarray], pixel_mm, exposure: XrayExposure,
                       rng: np.random.Generator) -> np.ndarray:
    """The detector's log signal in nepers: -ln of the detected (primary, scatter, quantum noise, blur)
    over the unattenuated beam, from per-material areal densities (``areal``: ``{"mineral", "water",
    "fat"}`` -> (rows, cols) g/cm2); ``rng`` draws the quantum noise."""
    pixel = float(np.mean(pixel_mm))
    primary = primary_transmission(areal, exposure.kvp, exposure.al_mm)
    # Scatter comes from where the beam meets matter: weight the primary by the mass it crossed.
    mass = sum(areal[m] for m in MATERIALS)
    source = primary * mass / max(float(mass[mass > 1].mean()) if (mass > 1).any() else 1.0, 1e-6)
    scatter = exposure.scatter_to_primary * ndimage.gaussian_filter(
        source * primary.mean(), exposure.scatter_sigma_mm / pixel, mode="nearest")
    expected = (primary + scatter) * exposure.photons_per_pixel
    counts = rng.poisson(expected).astype(np.float64) / exposure.photons_per_pixel
    counts = ndimage.gaussian_filter(counts, exposure.blur_px, mode="nearest")
    return -np.log(np.clip(counts, 1e-5, None))


def simulate_radiograph(areal: dict[str, np.ndarray], pixel_mm, exposure: XrayExposure,
                        rng: np.random.Generator, presentation: str = "processed") -> np.ndarray:
    """A radiograph (0..1, bone bright) from per-material areal densities.

    Args:
        areal: ``{"mineral", "water", "fat"}`` -> (rows, cols) line integrals in g/cm2.
        pixel_mm: Detector pixel [row, col] in mm.
        exposure: Acquisition and processing parameters.
        rng: Random generator for the quantum noise.
        presentation: ``processed``: windowed on the image's own percentiles, tone curve and unsharp
            masking (a DX workstation's "for presentation" image); ``raw``: the detector's log signal
            (:func:`detector_log_image`) at :data:`RAW_PER_NEPER` units per neper above
            :data:`RAW_OPEN_BEAM`, over :data:`FULL_SCALE` (a "for processing" image: the same scale
            for every radiograph). Both draw the same noise.
    """
    if presentation not in PRESENTATIONS:
        raise ValueError(f"presentation must be one of {', '.join(PRESENTATIONS)}, not {presentation!r}")
    log_image = detector_log_image(areal, pixel_mm, exposure, rng)
    if presentation == "raw":
        return np.clip((RAW_OPEN_BEAM + log_image * RAW_PER_NEPER) / FULL_SCALE, 0, 1)
    pixel = float(np.mean(pixel_mm))
    lo, hi = np.percentile(log_image, [exposure.window_low_pct, exposure.window_high_pct])
    v = np.clip((log_image - lo) / max(hi - lo, 1e-6), 0, 1) ** exposure.gamma
    v = v + exposure.unsharp_amount * (v - ndimage.gaussian_filter(v, exposure.unsharp_sigma_mm / pixel,
                                                                     mode="nearest"))
    return np.clip(v, 0, 1)
