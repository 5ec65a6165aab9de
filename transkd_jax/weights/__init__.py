"""Weights in and out of transkd_jax's models: the package under ``transkd_jax.convert``
(PyTorch / HuggingFace -> Orbax) and ``transkd_jax.export`` (Orbax -> PyTorch /
HuggingFace), which are only their command lines.

    readers    checkpoint files (safetensors, PyTorch, *.index.json, HF directories)
               -> state dicts {name: numpy array}
    names      HuggingFace / mmseg / wrapper names <-> the public PyTorch code's names;
               which layout a state dict is in (source_format)
    layouts    the Flax tree <-> public names (torch_name) and array layouts;
               a tree as a public state dict (to_public_state_dict)
    arch       --arch (mit_b2, pvt_v2_b0, lvt, a variant row) -> family and variant
    infer      family and variant read off a state dict or a Flax tree (infer_model)
    model      a family's Flax model and its variables' shapes (abstract evaluation)
    decoder    a freshly initialised decoder for a bare encoder
    to_flax    a state dict -> the Flax variables of a model (to_flax_variables)
    record     saving: the Orbax checkpoint and its transkd_convert.json record
    hf_config  HuggingFace config.json / preprocessor_config.json, and the inputs
               (normalisation, image size, class names) a checkpoint declares
    writers    exported files: the HF directory, the public model.pth, model.onnx
    onnx_graph an ONNX graph written by hand: the builder and the layers
    onnx_models the three families as ONNX graphs (needs onnx)
    cli        the parser and error handling both command lines share

The model families themselves are ``transkd_jax.models.archs.ARCHS``' rows.
"""
