"""fastmveb: fast MVEB self-supervised pretraining (FFCV loading, GPU views, compiled bf16 training)."""
__version__ = "0.1.0"
