"""The tiny offline world and its model factory: everything the default profile builds for itself.

``world`` invents a seeded encyclopedia and its questions; ``tokenizer`` trains a byte-level BPE on
it; ``recipes`` writes what the two bases learn from; ``pretraining`` builds and trains the tiny
Qwen3-architecture bases; ``base_eval`` measures the policy base for notebook 00. Nothing outside
the tiny profile needs this package: a GPU profile loads real models and datasets instead.
"""
