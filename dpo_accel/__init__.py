"""dpo_accel: preference optimisation (DPO and its family) on a plain Hugging Face Accelerate loop.

From Python::

    from dpo_accel import load_recipe, run
    summary = run(load_recipe("recipes/smollm2_arith_lora.yaml", ["train.max_steps=20"]))

`run` makes the checks of the command line (`preflight`); `PreferenceLogpsModel` is the training module
(the HF model plus its log-prob computation, one forward for `accelerator.prepare`); `LOSSES` is the
registry of objectives and `compute_objective` the loss of one batch; `concatenated_forward` and
`preference_loss` are the seed's two functions.
"""
from dpo_accel.model.logps import PreferenceLogpsModel, concatenated_forward
from dpo_accel.objectives.registry import LOSSES, compute_objective, preference_loss
from dpo_accel.config.plan import preflight
from dpo_accel.config.load import load_recipe
from dpo_accel.config.schema import Recipe
from dpo_accel.train import run

__all__ = ["LOSSES", "PreferenceLogpsModel", "Recipe", "compute_objective", "concatenated_forward", "load_recipe",
           "preference_loss", "preflight", "run"]
__version__ = "0.1.0"
