"""Optional bridges to tools people already run: Lightning (``gradprobe[lightning]``) and
TensorBoard (``gradprobe[tensorboard]``). Each submodule imports its framework on import, so
the base package never needs them."""
