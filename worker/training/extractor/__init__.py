"""Training of the face extractor F, split as arcface_torch splits its trainer: ``config``
(the run's settings), ``losses`` (ArcFace and the heads' weighting), ``model`` (backbone
and heads), ``data`` (the three data sets), ``state`` (what a step changes, and its
checkpoints), ``steps`` (the head fit and one joint step), ``measures`` (verification and
the heads' scores) and ``loop`` (the linear loop).

(PAPER.md §3, Eq. 10): ``L_F = L_arc + L_siamese + L_race + L_attr``.

Two phases. First the heads and the ArcFace class centres are fitted on frozen
backbone features, computed once: fresh random heads would otherwise send
large, meaningless gradients into the pretrained backbone at the start of
joint training. Then every step draws one batch from each of the three data
sets in turn (identity, race, attributes) and sums their losses, so every loss
moves F on every step; BatchNorm keeps its pretrained running statistics.
Data order comes from ``StepSampler`` and dropout from the global RNG, whose
state the checkpoint keeps: a resumed run takes exactly the steps it would
have taken uninterrupted. At the end F's verification angle θ_t is fitted on
training people and scored on held-out ones.

The Siamese term comes from an optional last stage (``meta_epochs``, the
paper's Algorithms 1–2, ``worker/training/lookalikes.py``): each meta-epoch makes lookalikes
with the search steered by the current F and its θ_t, then trains
``siamese_steps`` joint steps with ``L_siamese`` added, then measures F and
re-fits θ_t. The checkpoint records the meta-epoch and the step within it.
"""
