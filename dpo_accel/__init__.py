"""dpo_accel: preference optimisation (DPO and its family) on a plain Hugging Face Accelerate loop."""
from dpo_accel.logps import concatenated_forward
from dpo_accel.losses import preference_loss

__all__ = ["concatenated_forward", "preference_loss"]
__version__ = "0.1.0"
