"""The Flax port of Qwen3-VL: layers, text decoder, full model."""
