"""Model factories (``create_model``) and pretrained-weight loading."""

from dnfer.models.factory import FERNet, create_model, model_preprocessing  # noqa: F401
