"""Optional bridges to tools people already run: Lightning (``gradprobe[lightning]``),
TensorBoard (``gradprobe[tensorboard]``) and Weights & Biases (``gradprobe[wandb]``). Each
submodule imports its framework on import, so the base package never needs them."""
