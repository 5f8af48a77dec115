"""Neuron masks: locating key neurons (locate), mask files (io) and applying them to DeepSpeed (apply)."""
