"""StyleGAN2 training, split as arcface_torch splits its trainer: ``config`` (the run's
settings), ``losses`` and ``vae`` (the objectives), ``discriminator`` (the network G
trains against), ``state`` (what a step changes, and its checkpoints), ``steps`` (one
training step), ``export`` (what a run leaves behind) and ``loop`` (the linear loop).

One step of the ``gan`` objective = a D update (non-saturating logistic loss on
DiffAugment-ed reals and fakes, plus lazy R1 every ``r1_every`` steps) then a G
update (plus lazy path-length regularisation when enabled) then the EMA of G.
The ``vae`` objective replaces the adversarial updates with an encoder + G
reconstruction update; ``vae-gan`` does all three. Every random draw comes from the
global torch RNG or from generators seeded by (seed, step), so a checkpoint that
stores the RNG states and the step resumes bit-for-bit.
"""
