"""Reference code: the released MVEB training pipeline's behaviour re-derived and kept only to compare against in
the benchmarks (never used in training): per-sample PIL views (released_transforms), the N x N x d entropy
estimator (released_entropy), per-parameter LARS (released_lars) and the step and loader that combine them
(released_pipeline). Restated from docs/method.md, not copied."""
