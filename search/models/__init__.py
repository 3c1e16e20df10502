"""Where weights and data come from: model sources and built-ins (`sources`), fine-tuned experts
(`experts`), generated data sets (`datasets`), safetensors I/O (`tensors`), set-up progress
(`progress`) and tiny test models (`tiny`)."""

__all__ = ["datasets", "experts", "progress", "sources", "tensors", "tiny"]
