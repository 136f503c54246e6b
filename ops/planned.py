"""Names that later work will add: using one gives a precise "not available yet" error instead of "unknown name"."""

from __future__ import annotations

from datasel.ops.registry import planned

_GRADIENTS = "the per-example LoRA gradient operators (LESS, G2IS, ClusterUCB)"
for _name in ("grad_adam", "grad_sgd", "val_grad"):
    planned(_name, _GRADIENTS)
planned("graphwalk", "the G2IS gradient graph walk")
planned("pca", "the gradient-feature operators (G2IS)")
planned("less", "the gradient-feature operators (LESS)")
planned("bandit", "the ClusterUCB bandit selector")
planned("golden", "the Nuggets golden-score operator")
planned("whisper", "the Data Whisperer in-context scoring operator")
planned("mig", "the MIG label-graph selector")
planned("tags", "the label operators (MIG)")
