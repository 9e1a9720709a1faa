"""FlowCloud: semantic segmentation of live edge video on GPU machines."""

__version__ = "0.1.0"
