"""The embedded end-to-end demo: corpus, plan, stages, real-model stages, the recovery comparison."""
