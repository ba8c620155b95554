"""Models: the tutorial's AlexNet32, torchvision and timm classifiers by name, and heads on frozen features.

Modules: alexnet32, build, heads, mil, preprocess, timm_models, torchvision_models, weights_file.
"""

from histoflow.models.alexnet32 import AlexNet32
from histoflow.models.heads import LinearHead, MLPHead, build_encoder, encoder_with_head
from histoflow.models.mil import ABMIL, MaxPool, MeanPool, is_bag_head
from histoflow.models.preprocess import Preprocess, input_preprocess, model_preprocess
from histoflow.models.timm_models import timm_model
from histoflow.models.torchvision_models import (
           classifier_head,
           clean_state_dict,
           torchvision_model,
)

__all__ = ["ABMIL", "AlexNet32", "MaxPool", "MeanPool", "is_bag_head", "LinearHead", "MLPHead", "Preprocess",
           "build_encoder", "clean_state_dict", "classifier_head", "encoder_with_head", "input_preprocess",
           "model_preprocess", "timm_model", "torchvision_model"]
