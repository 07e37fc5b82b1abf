"""The method layer: a distillation config -> named, weighted loss terms.

A student's objective is a weighted sum of named terms (torchdistill's idea)::

    total = sum_i  weight_i * ramp_i(epoch) * term_i(student features, teacher features)

A *method* is a ready-made list of terms with the weights the reference code uses, registered in
`METHODS` beside its own code and adapters, one module per family (in the order of `METHODS`):

    logit.py        kd, dkd, dist, lskd, wttm, mlkd, nkd, sdd, mse_logits, fm
    feature.py      fitnet, ofd, at, sp, nst, vid, reviewkd, kdsvd, fsp, ab, ft (+ their adapters)
    relation.py     rkd, pkt, cc
    contrastive.py  crd (+ the CRD head and its memory bank)
    adversarial.py  adv (+ the discriminator)
    build.py        'ce' (labels only), get_config, build_terms and the checks on the terms
    transformer.py  deit (a distilled ViT student's two heads; imported after 'ce' is registered)
    sequence.py     reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl, taid, ab_divergence,
                    topk_kd (the language-model divergences; appended after 'ce')
    gram.py         ickd (+ its embedding), skd (Gram-matrix methods; appended after sequence.py's)
    projector.py    srd (+ its projector and normalisation; appended after gram.py's)

and beside them: core.py (`Term`, `Context`, `Distiller`, feature names, the global batch),
registry.py (`Method`, `METHODS`, `register` and a builder's toolkit), ensemble.py (several
teachers), layers.py (adapter building blocks), ctkd.py (the learned temperature). Adding a method
is one loss function in `kdjax.losses` (when the loss is new) plus one registered builder
(`@register(...)`, docs/adding-a-method.md); nothing else changes. What configs and tests need to
know about a method (it softens with a temperature, reads the strong view, is batch-level, reads
feature maps, needs equal widths, needs a distilled ViT student) are fields of its `Method`.

Config (``config.distill``, built by `get_config`)::

    method        'kd'; several joined with '+' combine their terms ('kd+at'); 'ce' = labels only
    temperature   softening temperature shared by the logit methods whose own ``temperature``
                  is None (kd, dkd, dist); lskd, nkd and fm carry their reference temperature
                  (wttm has none: its teacher is power-transformed, its student at T = 1)
    logit_standardize  modifier: per-sample z-scored student and teacher logits for every term
                  that reads both (Sun et al. CVPR 2024), e.g. dkd + logit standardisation
    ctkd          modifier: ctkd.enabled learns the temperature of the temperature-based methods
                  (CTKD, Li et al. AAAI 2023: gradient reversal, cosine curriculum of lambda)
    ce_weight     weight of the hard-label cross-entropy; None -> the largest reference CE weight
                  of the chosen methods
    <method>      one sub-dict per method with its hyper-parameters, e.g. distill.kd.weight;
                  every method has weight, warmup_epochs, student, teacher (feature names)
    terms         extra custom terms: name -> dict(loss=<kdjax.losses function name>, weight=...,
                  student=<feature name(s)>, teacher=<...>, warmup_epochs=0, kwargs={...})

Feature names (``student`` / ``teacher``) are comma-separated strings (or tuples) of the names a
model sows (`kdjax.models.feature_names`); two patterns keep one default valid for every model
family: ``stage*`` = all ``stage<N>`` features in forward order (RepDistiller's ``feat[1:-1]``),
``stage[-1]`` = the last one (RepDistiller's ``feat[-2]``). E.g. 'stage*,embedding'.

Weight naming. RepDistiller writes ``gamma*CE + alpha*KD + beta*feature`` (flags -r, -a, -b),
mdistiller writes ``ce_weight*CE + kd_weight*KD``; here every term carries its own ``weight`` and
the CE weight is ``distill.ce_weight``, so "alpha" never has to be interpreted. RepDistiller's
feature methods run with -r 1 -a 0 -b <weight>: CE weight 1, no KD term, feature weight = -b.

Trainable adapters (regressors, embeddings, ...) are Linen modules created inside a term's
function; `Distiller` owns them, and the trainer optimises them together with the student. Their
BatchNorm statistics and the CRD memory bank are non-parameter collections of the Distiller
('batch_stats', 'crd_memory'), updated only when ``ctx.train`` is True. ``ctx.train`` True means
"inside the data-parallel step": the code runs under shard_map/pmap with axis `AXIS`, so adapter
BatchNorm is synchronised over it and the CRD memory update all-gathers the global batch.

Global batch. Batch-level terms (RKD, PKT, CC, SP, DIST, and custom terms with one of those
losses; ``Term.global_batch``) compare examples with each other, so inside the data-parallel step
the Distiller all-gathers their inputs (student and teacher features, labels, indices) over
`AXIS` and every device evaluates the term on the *global* batch: 1, 2 or 8 devices give the same
value and the same gradient. Gradient convention (kdjax.step): a device's loss is the mean of the
per-example terms over its own share plus the global-batch terms; the step then averages the
per-device gradients (pmean). The transpose of the all-gather sums every device's cotangent for
this device's share (D identical copies of the term, so D times its part of the gradient), and
the pmean divides by D again: the result is exactly the gradient of the global-batch term, with no
double counting. CRD is per example (its negatives come from the memory bank, which is updated
from the all-gathered batch; its normaliser Z is a global-batch mean), so it needs no gather.

Ensembles. With several teachers, the teacher's 'logits' (kdjax.step.teacher_features) carry a
teacher axis: (B, n, K). Every logit term combines them at its own temperature T (the learned one
under CTKD), as multi-teacher KD defines it: the target is the weighted average of the teachers'
softened distributions, sum_i w_i softmax(z_i / T) (`ensemble_logits`), with weights
``Context.teacher_weights`` (the Distiller's ``teacher_weights``; default equal). Terms without a
temperature (wttm, mse_logits, custom terms without one) combine at T = 1. With logit
standardisation each teacher is standardised first. Every other teacher feature is the first
teacher's: the trainer puts `teacher.feature_source` first, or refuses feature terms for an
ensemble (`ensemble_order`).

Two augmented views. With ``config.augment.views='weak,strong'`` the step also makes a strongly
augmented view of the batch (`kdjax.data.strong_augment`) and hands the terms its features under
``STRONG + name`` ('strong/logits', 'strong/stage*'); the unprefixed names stay the weak view's,
so a term that reads no 'strong/' feature is unchanged. A method whose terms read them (``Method
.views``: mlkd) without the views is refused in one line (`check_views`), as are views that no
term reads. MLKD's hard-label CE on the strong view is its own term, 'mlkd_ce_strong'.

What the trainer passes (`build_terms` keyword arguments): ``num_data`` (training-set size: rows of
the CRD memory) and ``dataset_labels`` (training labels: CRD draws negatives from other classes,
as RepDistiller's default 'exact' mode). Only CRD needs them; without them CRD fails at trace
time with a message saying so.
"""

from kdjax.distill.build import (  # first: it imports the method families in the order of METHODS
    GLOBAL_BATCH_LOSSES,
    build_terms,
    check_features,
    check_views,
    get_config,
    init_terms,
    method_names,
    needs_teacher,
)
from kdjax.distill.adversarial import Discriminator
from kdjax.distill.contrastive import CRD
from kdjax.distill.core import (
    AXIS,
    CRD_COLLECTION,
    CTKD_COLLECTION,
    STRONG,
    VIEWS,
    Context,
    Distiller,
    Term,
    global_batch,
    reads_strong_view,
    resolve_features,
    with_strong_view,
)
from kdjax.distill.ctkd import CTKD_DEFAULTS, CTKDTemperature
from kdjax.distill.ensemble import ensemble_logits, ensemble_order
from kdjax.distill.feature import ABF, ConvReg, OFDConnector, Paraphraser, Translator, VIDRegressor
from kdjax.distill.layers import Embed
from kdjax.distill.registry import METHODS, Method, register

__all__ = [
    # the objective and its terms
    "AXIS", "CRD_COLLECTION", "CTKD_COLLECTION", "Context", "Term", "Distiller", "global_batch",
    # feature names and the strong view
    "resolve_features", "STRONG", "VIEWS", "with_strong_view", "reads_strong_view",
    # methods
    "Method", "METHODS", "register", "GLOBAL_BATCH_LOSSES", "CTKD_DEFAULTS",
    # config -> terms, and the checks on them
    "get_config", "method_names", "build_terms", "needs_teacher", "init_terms", "check_features", "check_views",
    # ensembles
    "ensemble_logits", "ensemble_order",
    # adapters (Linen modules)
    "Embed", "ConvReg", "OFDConnector", "VIDRegressor", "ABF", "Paraphraser", "Translator", "CRD", "Discriminator",
    "CTKDTemperature",
]
