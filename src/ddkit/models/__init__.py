"""Networks for distillation and evaluation, behind one registry.

>>> from ddkit.models import create
>>> model = create("convnet", in_channels=3, num_classes=10, image_size=32)
>>> model.embedding_dim
2048

Every model is a :class:`TapModel`: ``model(x)`` gives logits ``[N, num_classes]``,
``model.embed(x)`` the classifier's input ``[N, embedding_dim]``, and
``model.forward_taps(x, names)`` named intermediate tensors (see ``model.tap_names``).

Registered: ``convnet`` (the standard backbone, the DC ConvNet), ``mlp``, ``alexnet``, ``vgg11``,
``resnet18``, ``resnet18_bn``, ``resnet18_in``, ``wrn``, ``wrn16_2``, ``mobilenetv2``,
``mobilenetv2_crd``, ``shufflenetv2``, ``shufflenetv2_crd``, and the ImageNet-layout networks
with torchvision's state-dict keys (:mod:`ddkit.models.imagenet`): ``imagenet_resnet18``,
``imagenet_resnet50``, ``imagenet_mobilenet_v2``, ``imagenet_shufflenet_v2``,
``imagenet_efficientnet_b0``. G-VBSM's teachers are the CRD model
zoo's networks: ``resnet18_bn``, ``wrn16_2``, ``mobilenetv2_crd`` and ``shufflenetv2_crd``
(:mod:`ddkit.models.crd` loads their reference checkpoints).
"""

from ddkit.models.base import TapModel, count_parameters
from ddkit.models.registry import available, build, create, register

# imported for their @register side effects
from ddkit.models import alexnet as _alexnet  # noqa: E402,F401  isort: skip
from ddkit.models import convnet as _convnet  # noqa: E402,F401  isort: skip
from ddkit.models import imagenet as _imagenet  # noqa: E402,F401  isort: skip
from ddkit.models import mlp as _mlp  # noqa: E402,F401  isort: skip
from ddkit.models import mobilenet as _mobilenet  # noqa: E402,F401  isort: skip
from ddkit.models import resnet as _resnet  # noqa: E402,F401  isort: skip
from ddkit.models import shufflenet as _shufflenet  # noqa: E402,F401  isort: skip
from ddkit.models import vgg as _vgg  # noqa: E402,F401  isort: skip
from ddkit.models import wrn as _wrn  # noqa: E402,F401  isort: skip
from ddkit.models.convnet import ConvNet, default_depth  # noqa: E402  isort: skip
from ddkit.models.crd import CRD_MODELS, crd_to_ddkit_keys, load_crd_state_dict  # noqa: E402  isort: skip

__all__ = [
    "CRD_MODELS",
    "ConvNet",
    "TapModel",
    "available",
    "build",
    "count_parameters",
    "create",
    "crd_to_ddkit_keys",
    "default_depth",
    "load_crd_state_dict",
    "register",
]
