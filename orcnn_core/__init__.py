"""ORCNN amodal instance segmentation: model, data, metrics and command line (no ROS)."""

__version__ = "0.1.0"
