"""The model room: building models, their input, hooks; it imports no stage.

- registry.py: build_model (synthnet, torchvision, factory), safe checkpoint loading.
- input.py: the model's input: device choice, the one resize + normalisation, model preparation.
- layouts.py: how a layer's output is a feature map [N, C, H, W] (nchw, nhwc, tokens), and back.
- hooks.py: LayerRecorder, forward hooks on dotted layer names (`@K` calls of re-used modules).
- edits.py: hooks that edit a layer's output (zero_units, fix_units, grouped ablation).
- probe.py: every module in one forward pass (probe_layers); the check of listed layers.
- synthnet.py: the reference CNN and its training.

This file imports nothing (config.py reads the default normalisation without loading torch).
"""

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
