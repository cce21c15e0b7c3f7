"""The released MVEB training pipeline restated for side-by-side benchmarks (never used in training): per-sample
PIL views (transforms), the N x N x d entropy estimator (entropy), per-parameter LARS (lars) and the step and
loader that combine them (pipeline). Restated from docs/method.md, not copied."""
