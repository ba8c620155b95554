"""Models: the tutorial's AlexNet32 and any torchvision classifier by name."""

from histoflow.models.alexnet32 import AlexNet32
from histoflow.models.zoo import clean_state_dict, classifier_head, torchvision_model

__all__ = ["AlexNet32", "clean_state_dict", "classifier_head", "torchvision_model"]
