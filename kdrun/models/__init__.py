"""Model zoo: every family registers its models on import."""
from kdrun.models.registry import MODELS, create_model, file_label, model_options, register_model
from kdrun.models import cifar_resnet  # noqa: F401  (registers models)
from kdrun.models import wrn  # noqa: F401
from kdrun.models import vgg  # noqa: F401
from kdrun.models import mobilenetv2  # noqa: F401
from kdrun.models import shufflenetv1  # noqa: F401
from kdrun.models import shufflenetv2  # noqa: F401
from kdrun.models import resnetv2  # noqa: F401
from kdrun.models import linear  # noqa: F401

__all__ = ["MODELS", "create_model", "file_label", "model_options", "register_model"]
