"""Forward every recorded probe step to a TensorBoard ``SummaryWriter``.

    from torch.utils.tensorboard import SummaryWriter
    from gradprobe.integrations.tensorboard import TensorBoardSink
    probe = gradprobe.Probe(model, run_file="run.gprobe", sinks=[TensorBoardSink(SummaryWriter())])

Each scalar ``(quantity, name)`` becomes the tag ``gradprobe/<quantity>/<name>`` at the probe
step (pair names keep their ``a|b`` form). The run file stays the complete record (arrays,
events); the dashboard gets the numbers.
"""

from __future__ import annotations

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as exc:  # torch's writer needs the tensorboard package
    raise ImportError("gradprobe.integrations.tensorboard needs TensorBoard: "
                      "pip install 'gradprobe[tensorboard]'") from exc


class TensorBoardSink:
    """A probe sink writing scalars to ``writer`` (flushed by the writer on its own schedule)."""

    def __init__(self, writer: SummaryWriter, prefix: str = "gradprobe"):
        if not hasattr(writer, "add_scalar"):
            raise TypeError(f"TensorBoardSink needs a SummaryWriter, got {type(writer).__name__}")
        self.writer = writer
        self.prefix = prefix

    @staticmethod
    def tag(prefix: str, quantity: str, name: str) -> str:
        return f"{prefix}/{quantity}/{name}"

    def write_step(self, step: int, scalars: dict[tuple[str, str], float]) -> None:
        for (quantity, name), value in scalars.items():
            self.writer.add_scalar(self.tag(self.prefix, quantity, name), value, global_step=step)
