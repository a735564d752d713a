"""Math: Marchenko–Pastur toolkit (numpy) and window spectra.

Import-light on purpose: `rmt` and `descriptors` need only numpy (the sidecar
uses them); `spectra` needs torch and is imported by the taps.
"""
