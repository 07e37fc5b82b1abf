"""Relational methods on the pooled embedding: rkd, pkt, cc (registered in this order). Each
relates the examples of a batch to each other, so each is a global-batch method."""

from __future__ import annotations

import functools

from kdjax import losses
from kdjax.distill.layers import Embed
from kdjax.distill.registry import defaults, loss_term, register, term


# RKD: Park et al. CVPR 2019; RepDistiller `--distill rkd -a 0 -b 1` on feat[-1] (pooled
# embedding), RKDLoss(w_d=25, w_a=50). Global batch: distances and angles between all pairs and
# triplets of the all-gathered batch under data parallelism.
@register("rkd", paper="Park, Kim, Lu, Cho. Relational Knowledge Distillation (CVPR 2019)", ce_weight=1.0,
          defaults=defaults(1.0, "embedding", "embedding", distance_weight=25.0, angle_weight=50.0), loss="rkd",
          global_batch=True)
def _rkd(h, temperature, data):
    fn = functools.partial(loss_term, losses.rkd, distance_weight=float(h["distance_weight"]),
                           angle_weight=float(h["angle_weight"]))
    return [term("rkd", fn, h)]


# PKT: Passalis & Tefas ECCV 2018; RepDistiller `--distill pkt -a 0 -b 30000` on feat[-1].
# Global batch: the B x B similarity distributions are over the all-gathered batch.
@register("pkt", paper="Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer "
                       "(ECCV 2018)",
          ce_weight=1.0, defaults=defaults(30000.0, "embedding", "embedding"), loss="pkt", global_batch=True)
def _pkt(h, temperature, data):
    return [term("pkt", functools.partial(loss_term, losses.pkt), h)]


# CC: Peng et al. ICCV 2019, as torchdistill CCKDLoss (configs/sample/ilsvrc2012/cckd: trainable
# Linear(D, 128) on the student's and the teacher's pooled embedding, gaussian kernel gamma 0.4,
# max_p 2, weight 0.003, CE 1). RepDistiller's CC (-b 0.02) uses a different loss formula, so its
# weight does not apply to `losses.correlation_congruence`. Global batch: the B x B correlation
# matrices are over the all-gathered batch (the embeddings are projected after the gather).
def _cc_fn(name, student, teacher, ctx, dim, gamma, order, normalize):
    s = Embed(dim, name=f"{name}_embed_s")(student)
    t = Embed(dim, name=f"{name}_embed_t")(teacher)
    return losses.correlation_congruence(s, t, gamma=gamma, order=order, normalize=normalize)


@register("cc", paper="Peng et al. Correlation Congruence for Knowledge Distillation (ICCV 2019)", ce_weight=1.0,
          defaults=defaults(0.003, "embedding", "embedding", dim=128, gamma=0.4, order=2, normalize=False),
          loss="correlation_congruence", global_batch=True)
def _cc(h, temperature, data):
    fn = functools.partial(_cc_fn, "cc", dim=int(h["dim"]), gamma=float(h["gamma"]),
                           order=int(h["order"]), normalize=bool(h["normalize"]))
    return [term("cc", fn, h)]
