"""Knowledge-distillation losses as pure JAX functions.

Every function here is a pure function of ``jnp`` arrays: no Flax, no config, no hidden state.
They are ``jax.jit``-able and differentiable, compute in float32 internally (so bf16 inputs are
fine) and return a float32 scalar unless stated otherwise. Each docstring gives the formula, the
reduction and the paper. The functions live in one module per family, all re-exported here
(``kdjax.losses.<name>``; ``__all__`` lists them):

* `kdjax.losses.logit`: logits ``(..., K)`` with integer labels of the leading shape: ``(B, K)``
  for classifiers, ``(B, T, V)`` for sequence models, as optax's losses. The padding mask
  ``where`` and the ``reduction`` that every logit loss takes are described once there
  ("Padding and reduction"). Also CTKD's learnable temperature.
* `kdjax.losses.sequence`: the divergences of language-model distillation (reverse KL, GKD's
  generalized JSD, DistiLLM's skewed KLs, TAID with its schedule, ABKD's alpha-beta divergence,
  KD from top-k teacher logits), on the same ``(..., V)`` logits with ``where`` and ``reduction``.
* `kdjax.losses.feature`: feature maps NHWC ``(B, H, W, C)`` (and lists of them).
* `kdjax.losses.relation`: embeddings ``(B, D)`` (those documented as flattening accept
  ``(B, ...)``) and the relations between the rows of a batch.
* `kdjax.losses.contrastive`: CRD, with its memory as explicit state (usage there).
* `kdjax.losses.penalty`: weight penalties of a parameter pytree.

Feature and relation losses take no mask: each docstring says which shapes it accepts (flatten a
``(B, T, D)`` sequence to the unpadded ``(N, D)`` tokens first where the loss relates rows of the
batch to each other).

Sequence distillation (a language model's (B, T, V) logits, ``mask`` (B, T) False at padding)::

    def loss_fn(params, tokens, mask, teacher_logits):
        logits = model.apply(params, tokens)                       # (B, T, V)
        return losses.kd(logits, teacher_logits, temperature=2.0, where=mask)

Shape errors (wrong rank, mismatched batch or shape) raise ``ValueError`` at
trace time, e.g. ``kd: student_logits and teacher_logits must have the same
shape, got (8, 10) and (8, 100)``.

Loss weights (the CE weight, the distillation weight, warm-up schedules,
learnable regressors/projections) belong to the trainer, not to these
functions; the only weights accepted here are the ones that mix the internal
terms of a single method (e.g. DKD's alpha/beta, RKD's distance/angle weights).

None of the functions applies ``jax.lax.stop_gradient`` to teacher inputs
(the teacher is normally not differentiated); wrap teacher outputs in
``stop_gradient`` yourself if the teacher is trainable and should not receive
gradients. The CRD memory banks and normalisation constants are state and are
always treated as constants.

Matrix products (Gram matrices, pooling, memory-bank scores) are computed with
``precision=HIGHEST`` so that TPU/GPU results match CPU float32 closely.

References are cited by repository and commit inspected:
RepDistiller (HobbitLong/RepDistiller @1e2f816), mdistiller
(megvii-research/mdistiller @a08d46f), torchdistill
(yoshitomo-matsubara/torchdistill @3e4373c), DIST
(hunto/image_classification_sota @6f7a70a, lib/models/losses/dist_kd.py),
logit standardisation (sunshangquan/logit-standardization-KD @f6e5aa5),
big_vision (google-research/big_vision @0127fb6,
big_vision/evaluators/proj/distill/distance.py), WTTM (zkxufo/TTM @fe457b3), NKD
(yzd-v/cls_KD @1e5d48f), CTKD (zhengli97/CTKD @7d52522), DistiLLM (jongwooko/distillm @17c0f98),
TAID (SakanaAI/TAID @a062892), ABKD (ghwang-s/abkd @a0fb144), DistillKit (arcee-ai/DistillKit
@361c7ac), ICKD (ADLab-AutoDrive/ICKD @04e1d3e), TRL's GKD (trl/trainer/gkd_trainer.py ``generalized_jsd_loss``).
"""

from __future__ import annotations

from kdjax.losses.logit import (
    cross_entropy,
    ctkd_lambda,
    ctkd_temperature,
    deit,
    dist,
    dkd,
    gradient_reversal,
    kd,
    logit_standardize,
    logit_standardized_kd,
    mlkd,
    mse_logits,
    multiscale_logits,
    nkd,
    sdd,
    skd,
    soft_cross_entropy,
    wttm,
)
from kdjax.losses.sequence import (
    ab_divergence,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    taid,
    taid_init,
    taid_update,
    topk_kd,
)
from kdjax.losses.feature import (
    activation_boundary,
    attention_transfer,
    factor_transfer,
    fitnet,
    fsp,
    hcl,
    ickd,
    kdsvd,
    nst,
    ofd,
    ofd_margin,
    similarity_preserving,
    vid,
)
from kdjax.losses.relation import (
    correlation_congruence,
    cosine_distance,
    discriminator_bce,
    dist_plus,
    pkt,
    rkd,
    srd,
)
from kdjax.losses.contrastive import (
    crd_contrast_loss,
    crd_init_memory,
    crd_nce,
    crd_sample_negatives,
    crd_update_memory,
)
from kdjax.losses.penalty import (
    l1_penalty,
    l2_penalty,
)

__all__ = [
    # logits
    "cross_entropy",
    "soft_cross_entropy",
    "kd",
    "dkd",
    "dist",
    "logit_standardized_kd",
    "logit_standardize",
    "wttm",
    "mlkd",
    "nkd",
    "deit",
    "multiscale_logits",
    "sdd",
    "skd",
    "dist_plus",
    "mse_logits",
    # language-model distillation (kdjax.losses.sequence; any (..., V) logits)
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "taid",
    "taid_init",
    "taid_update",
    "ab_divergence",
    "topk_kd",
    # learnable temperature (CTKD)
    "gradient_reversal",
    "ctkd_lambda",
    "ctkd_temperature",
    # features
    "fitnet",
    "ofd_margin",
    "ofd",
    "attention_transfer",
    "similarity_preserving",
    "nst",
    "vid",
    "hcl",
    "kdsvd",
    "fsp",
    "activation_boundary",
    "factor_transfer",
    "ickd",
    # embeddings / relations
    "rkd",
    "pkt",
    "correlation_congruence",
    "cosine_distance",
    "discriminator_bce",
    "srd",
    # CRD
    "crd_init_memory",
    "crd_sample_negatives",
    "crd_contrast_loss",
    "crd_nce",
    "crd_update_memory",
    # weight penalties
    "l2_penalty",
    "l1_penalty",
]
