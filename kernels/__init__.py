"""Math, importing nothing else of eigenwatch: the Marchenko–Pastur toolkit
(`rmt`) and window descriptors (`descriptors`), numpy only, which the sidecar
uses; the window spectra of the taps (`window_bank`: the incremental window
state, `gram`: the one centred-Gram spectrum), torch; one Triton op per file
(`triton_gram_update`, `triton_eigvalsh`), chosen in `backend`.
"""
