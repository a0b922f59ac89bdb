"""``relearning``: Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024, "Diagnosing and Re-learning for
Balanced Multimodal Learning"; spec ``../shared/spec/methods-more.md`` §27, defaults §32), after the official
``GeWu-Lab/Diagnosing_Relearning_ECCV2024/code/ours.py``.

Per step (§27.2): plain joint cross-entropy of the fusion head, ``L = CE(g_f([f^1; …; f^M]), y)``; one
backward, one step. The method is a between-epoch schedule (§27.3):

    θ⁰ ← copy of every encoder's parameters before the first step
    after epoch e (0-based), if e > 0 and e mod E_r = 0 and (re-inits so far) < N_r, for each modality m:
        for S in {train, val}:   X = MinMaxScale_S(F^m_S) ∈ [−1, 1]       (scaler fitted on S alone)
                                 c = KMeans(k = C, n_init, random_state = seed).fit_predict(X)
                                 purity_S = (1/|S|) Σ_k max_y |{i ∈ cluster k : y_i = y}|
        gap_m = |purity_train − purity_val|,   α_m = tanh(λ · gap_m)
        θ ← α_m θ⁰ + (1 − α_m) θ       for every parameter of encoder m (weights, biases, BN affine)

A modality whose clusters generalise worse from train to validation (larger purity gap) is pulled harder
back towards its initialisation. The fusion head, the BatchNorm running statistics, the unimodal heads and
the optimiser state (momentum) are left as they are. ``F^m_S`` are the eval-mode, no-grad encoder features
of the whole split (``runtime.encode_rows``). Evaluation: the plain fused logits.

Params (§27.5 harness row, §32): ``lam`` (λ = 3, the official ``move_lambda``; BB 3), ``reinit_every``
(E_r = 20, official ``reinit_epoch``; BB 15), ``reinit_max`` (N_r = 3, official ``reinit_num``; BB 2): with
70 epochs the re-inits follow the epochs with 0-based index 20, 40 and 60; ``n_init`` (10 KMeans restarts,
pinned, §27.7). No per-dataset differences (§32: KS "same"). Logs per epoch ``reinits`` (the count so far);
in the epoch that starts with a re-init also ``purity_train_<m>``, ``purity_val_<m>`` and ``alpha_<m>``
(§27.7: both purities are logged, as they are measured in different coordinates).

Departures from the official code:

* When: the official code checks after validation of epoch e; here the check runs in ``on_epoch_start(e +
  1)``, before the first step of epoch e + 1. The model it sees is the same, the checkpoint of epoch e is
  still from before the re-init (as in the official code, §27.3), and a resumed run re-initialises exactly
  as an uninterrupted one. A re-init after the last epoch (which nothing evaluates) is not run.
* θ⁰ is captured at the start of epoch 0 (after seeded construction, not before the device move), and only
  the encoders' parameters are kept: the official code copies every parameter but blends only the encoders.
  θ⁰ and the re-init count are method state (checkpointed, §27.4 STATE).
* KMeans ``random_state`` is the run seed (official 0; §27.5 harness row) and ``n_init = 10`` is pinned
  (the official code takes the library default, which scikit-learn 1.4 changed to ``'auto'``, §27.7).
* The validation split is the harness' val split (the official code validates and selects on its test set,
  §27.6); the feature passes use no augmentation (as the official ``my_train`` mode, §27.6).
* A split with fewer rows than C is clustered into as many clusters as rows (KMeans refuses k > n; never
  the case on the benchmark datasets).
* The encoder parameters are found by module (``model.encoders[m]``), not by a parameter-name substring (BB)
  or the official model's attribute names; every modality of the model is diagnosed (the official code has
  audio and visual hard-coded).
* Under data parallelism (§27.9): ``encode_rows`` gathers the features of every rank without the padding
  duplicates (R5); rank 0 fits the scalers and KMeans and broadcasts the purities and α (R6); every rank
  blends its own, identical, replica.
* The optimiser and schedule are the harness' common protocol (SGD lr 1e-3, StepLR(50, 0.1)), not the
  official script's lr 2e-3 without scheduler, and training uses the dataset's own pipeline; both are run
  config, the same for every method (§27.5, §27.6).
* The model's unimodal heads are not trained (left out of the optimiser, as in ``joint``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method, without_unimodal_heads

# per modality, the broadcast diagnosis row: (purity_train, purity_val, α)
DIAGNOSIS = ("purity_train", "purity_val", "alpha")

# --------------------------------------------------------------------------------------- functional core


def cluster_purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """§27.3: (1/N) Σ_k max_y |{i ∈ cluster k : y_i = y}|, the share of rows carrying their cluster's
    majority label (official ``ours.py:63–95``)."""
    labels = np.asarray(labels, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("cluster_purity: no rows")
    _, cluster_ids = np.unique(clusters, return_inverse=True)
    _, label_ids = np.unique(labels, return_inverse=True)
    table = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_ids, label_ids), 1)  # contingency: rows of each label in each cluster
    return float(table.max(axis=1).sum() / labels.size)


def kmeans_purity(
    features: np.ndarray, labels: np.ndarray, num_clusters: int, n_init: int, seed: int
) -> float:
    """§27.3: min-max scale the split's features to [−1, 1] (a scaler fitted on this split alone,
    ``ours.py:108–109``), cluster them with KMeans(k = C), and score the clusters' purity."""
    from sklearn.cluster import KMeans  # lazily: only a re-init needs scikit-learn's clustering
    from sklearn.preprocessing import MinMaxScaler

    if len(features) == 0:
        raise ValueError("kmeans_purity: the split has no rows")
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    k = min(num_clusters, len(scaled))  # KMeans refuses more clusters than rows
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(scaled)
    return cluster_purity(labels, clusters)


def reinit_strength(purity_train: float, purity_val: float, lam: float) -> float:
    """§27.3: α = tanh(λ · |purity_train − purity_val|) (``ours.py:122–127``)."""
    return math.tanh(lam * abs(purity_train - purity_val))


def reinit_due(finished_epoch: int, every: int, limit: int, done: int) -> bool:
    """§27.3: after 0-based epoch e, re-initialise iff e > 0, e mod E_r = 0 and fewer than N_r so far."""
    return finished_epoch > 0 and finished_epoch % every == 0 and done < limit


@torch.no_grad()
def soft_reinit(encoder: nn.Module, theta0: dict[str, torch.Tensor], alpha: float) -> None:
    """§27.3: θ ← α θ⁰ + (1 − α) θ in place for every parameter of ``encoder`` (weights, biases, BN
    affine); buffers (BN running statistics) are not parameters and stay as they are."""
    for name, param in encoder.named_parameters():
        start = theta0[name].to(device=param.device, dtype=param.dtype)
        param.copy_(alpha * start + (1.0 - alpha) * param)


def encoder_snapshot(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """θ⁰ of one encoder: a detached copy of each parameter, on the parameter's device."""
    return {name: p.detach().clone() for name, p in encoder.named_parameters()}


# --------------------------------------------------------------------------------------------- method


class RelearningParams(Params):
    lam: float = Field(
        default=3.0, ge=0, description="λ of α_m = tanh(λ · gap_m) (official move_lambda 3; BB 3)"
    )
    reinit_every: int = Field(
        default=20,
        ge=1,
        description="E_r: re-init after 0-based epochs e > 0, e % E_r = 0 (official reinit_epoch 20; BB 15)",
    )
    reinit_max: int = Field(
        default=3, ge=0, description="N_r: at most this many re-inits (official reinit_num 3; BB 2)"
    )
    n_init: int = Field(
        default=10, ge=1, description="KMeans restarts, pinned (scikit-learn ≥ 1.4 defaults to 'auto', §27.7)"
    )


@register_method("relearning")
class Relearning(Method):
    fidelity = "official-code"
    Params = RelearningParams

    def __init__(self, params: RelearningParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.theta0: dict[str, dict[str, torch.Tensor]] | None = None  # per modality, per parameter name
        self.reinits = 0
        self._diagnosis: dict[str, float] = {}  # logged at the end of the epoch that began with a re-init

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    # ---- the step: plain joint CE (§27.2)
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        loss = F.cross_entropy(model.fuse(model.encode(batch.inputs)), batch.labels)
        return StepOutput(loss=loss, logs={"loss_fused": loss.detach()})

    # ---- the schedule (§27.3)
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self.theta0 is None:
            if epoch != 0:
                raise RuntimeError(
                    f"relearning: no θ⁰ at the start of epoch {epoch} (a resume without the method state?)"
                )
            self.theta0 = {m: encoder_snapshot(model.encoders[m]) for m in model.modalities}
        p = self.params
        if reinit_due(epoch - 1, p.reinit_every, p.reinit_max, self.reinits):  # the check after epoch − 1
            self.relearn(model)

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        logs, self._diagnosis = {"reinits": float(self.reinits), **self._diagnosis}, {}
        return logs

    def diagnose(self, model: MultimodalModel) -> torch.Tensor:
        """(M, 3) rows of (purity_train, purity_val, α), computed on rank 0 and broadcast (§27.9). Every rank
        runs the feature passes (a collective: each encodes a share, R5); only rank 0 clusters."""
        train, val = self.runtime.train_split, self.runtime.val_split
        if train is None or val is None:
            raise RuntimeError("relearning: the diagnosis needs a runtime bound to a run (train and val)")
        passes = [
            self.runtime.encode_rows(model, np.arange(len(train))),
            self.runtime.encode_rows(model, np.arange(len(val)), split=val),
        ]
        stats = torch.zeros(len(model.modalities), len(DIAGNOSIS), dtype=torch.float64)
        if self.runtime.rank == 0:
            for i, m in enumerate(model.modalities):
                purity = [
                    kmeans_purity(
                        features[m].cpu().numpy(),
                        labels.cpu().numpy(),
                        self.context.num_classes,
                        self.params.n_init,
                        self.context.seed,
                    )
                    for features, labels in passes
                ]
                alpha = reinit_strength(purity[0], purity[1], self.params.lam)
                stats[i] = torch.tensor([purity[0], purity[1], alpha], dtype=torch.float64)
        return self.runtime.broadcast(stats)  # rank 0's diagnosis on every rank (R6)

    def relearn(self, model: MultimodalModel) -> None:
        """Diagnose every modality and softly re-initialise its encoder towards θ⁰ (§27.3)."""
        assert self.theta0 is not None
        stats = self.diagnose(model)
        for i, m in enumerate(model.modalities):
            soft_reinit(model.encoders[m], self.theta0[m], float(stats[i, 2]))
            self._diagnosis.update({f"{key}_{m}": float(stats[i, j]) for j, key in enumerate(DIAGNOSIS)})
        self.reinits += 1

    # ---- state: θ⁰ and the re-init count (identical on every rank, R6)
    def state_dict(self) -> dict[str, Any]:
        theta0 = None
        if self.theta0 is not None:
            theta0 = {
                m: {k: v.detach().cpu().clone() for k, v in ps.items()} for m, ps in self.theta0.items()
            }
        return {"theta0": theta0, "reinits": self.reinits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reinits = int(state["reinits"])
        if state["theta0"] is None:
            self.theta0 = None
            return
        device = self.runtime.device  # the parameters' device
        self.theta0 = {
            m: {k: v.clone().to(device) for k, v in ps.items()} for m, ps in state["theta0"].items()
        }
