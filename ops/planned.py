"""Names that later work will add: using one gives a precise "not available yet" error instead of "unknown name"."""

from __future__ import annotations

from datasel.ops.registry import planned

_GRADIENTS = "the per-example LoRA gradient operators (LESS, G2IS, ClusterUCB)"
planned("grad_sgd", _GRADIENTS)
planned("less", "the gradient-feature operators (LESS)")
planned("golden", "the Nuggets golden-score operator")
planned("whisper", "the Data Whisperer in-context scoring operator")
planned("mig", "the MIG label-graph selector")
planned("tags", "the label operators (MIG)")
