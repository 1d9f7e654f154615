"""LoRA deltas vs steering directions (peft): is a fine-tune just a constant vector?

Bring a peft LoRA adapter (or train one with :func:`train_adapter`) and ask how much of it a steering
vector explains:

* :func:`load_adapter` reads A, B and the scaling from peft and maps every LoRA'd module onto the
  TransformerLens weights (W_Q/W_K/W_V/W_O per head, grouped-query K/V, W_in/W_gate/W_out, fused qkv);
* :func:`merged_model` returns a new HookedTransformer with ΔW = scaling·B·A merged in;
* :func:`compare` measures the per-token write Δ_t of each changed sub-layer: its constancy, the loss
  recovered by the constant mean Δ, KL, and the weight-space geometry against a steering vector;
* :func:`mean_delta_vector` turns the LoRA into a steering vector, :func:`effective_vectors` gives the
  per-layer difference of means of the residual stream between the LoRA model and the base;
* :func:`adapter_activations` reads the r scalars A·x_t per token (rank 1: one neuron);
* :func:`train_adapter` and :func:`backdoor_examples` set up side-by-side studies.

Papers: Hu et al. 2021 (LoRA); Wang, Engels, Clive-Griffin 2025, "Simple Mechanistic Explanations for
Out-Of-Context Reasoning"; Ward et al. 2025, "Rank-1 LoRAs Encode Interpretable Reasoning Signals".
peft is an optional dependency (``pip install 'steer-lens[lora]'``), imported when first needed.
"""

from steer_lens.lora.activations import AdapterActivations, adapter_activations
from steer_lens.lora.adapter import (
    ARCHITECTURES,
    LoraAdapter,
    LoraModule,
    load_adapter,
    merged_model,
    validate,
)
from steer_lens.lora.comparison import (
    LoraComparison,
    compare,
    effective_vectors,
    mean_delta_vector,
    prepare_texts,
)
from steer_lens.lora.natural import natural_vector
from steer_lens.lora.state_sae import (
    LoraActivationState,
    LoraStateSAE,
    LoraStateSAEConfig,
    lora_activation_state,
    train_lora_state_sae,
)
from steer_lens.lora.state_sae_examples import top_activating_examples
from steer_lens.lora.train import LoraTrainConfig, LoraTrainResult, backdoor_examples, train_adapter

__all__ = [
    "ARCHITECTURES",
    "AdapterActivations",
    "LoraActivationState",
    "LoraAdapter",
    "LoraComparison",
    "LoraModule",
    "LoraStateSAE",
    "LoraStateSAEConfig",
    "LoraTrainConfig",
    "LoraTrainResult",
    "adapter_activations",
    "backdoor_examples",
    "compare",
    "effective_vectors",
    "load_adapter",
    "lora_activation_state",
    "mean_delta_vector",
    "merged_model",
    "natural_vector",
    "prepare_texts",
    "top_activating_examples",
    "train_adapter",
    "train_lora_state_sae",
    "validate",
]
