"""`transfer.synth=gaussian` (Haroush et al., CVPR 2020, "The Knowledge Within: Methods for Data-Free Model
Compression", Gaussian scheme): inputs drawn from N(0, 1) in the normalised input space, not optimised. The
student's BN layers are kept in eval mode while it trains on them (`transfer.freeze_bn=auto`), as the paper
prescribes: the noise's batch statistics would otherwise overwrite the running statistics the student starts
from. Stored as uint8 pixels: values outside 0..255 are clipped there (the record's
`synthetic_clipped_fraction` says how many)."""
from kdrun.transfer.synth.generate import Synthesis

GAUSSIAN = Synthesis("gaussian", "Haroush et al. 2020, Gaussian scheme: N(0, 1) inputs, student BN frozen", None)
