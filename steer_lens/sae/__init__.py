"""SAE features of steering vectors (sae-lens): which interpretable features a vector turns on, and
which of them carry its effect.

```python
import steer_lens as sl
sae = sl.sae.load("path/or/release", hook="blocks.0.hook_resid_post")            # sae-lens SAE
sae = sl.sae.train(model, "blocks.0.hook_resid_post", texts, d_sae=1024, k=16)   # sae-lens SAETrainer
feats = sl.sae.vector_features(steered, sae, k=20)           # the vector in feature space
shift = sl.analysis.activation_shift(steered, sae, texts)    # feature activations with vs without the vector
attr = sl.sae.attribute(steered, sae, texts, metric)         # which features carry the effect on a metric
attr.top(10); attr.plot(); shift.token_view()
```

sae-lens (``pip install steer-lens[sae]``) is imported when an SAE is loaded or trained. Every
function takes a sae-lens ``SAE`` or the :class:`TrainedSAE` that :func:`train` returns; metrics are
those of :mod:`steer_lens.metrics` (a ``Metric`` or any ``MetricFn``). How feature activations shift
when the vector is on (:func:`steer_lens.analysis.activation_shift`) lives with the other shifts in
:mod:`steer_lens.analysis`.
"""

from steer_lens.sae._core import HookMismatchWarning, SAEModelMismatchWarning
from steer_lens.sae.attribution import Attribution, attribute, splice_hooks
from steer_lens.sae.features import (
    FeatureLogitLens,
    FeatureTopTokens,
    VectorFeatures,
    feature_logit_lens,
    top_activating_tokens,
    vector_features,
)
from steer_lens.sae.training import (
    SAEQuality,
    SAETrainConfig,
    TrainedSAE,
    evaluate,
    load,
    sample_corpus,
    train,
)

__all__ = [
    "Attribution",
    "FeatureLogitLens",
    "FeatureTopTokens",
    "HookMismatchWarning",
    "SAEModelMismatchWarning",
    "SAEQuality",
    "SAETrainConfig",
    "TrainedSAE",
    "VectorFeatures",
    "attribute",
    "evaluate",
    "feature_logit_lens",
    "load",
    "sample_corpus",
    "splice_hooks",
    "top_activating_tokens",
    "train",
    "vector_features",
]
