"""Model zoo: every family registers its models on import."""
from kdrun.models.registry import MODELS, create_model, model_options, register_model
from kdrun.models import cifar_resnet  # noqa: F401  (registers models)

__all__ = ["MODELS", "create_model", "model_options", "register_model"]
