"""cnnvis-pipeline: Network Dissection and unit visualisation of CNNs at dataset scale.

Stages (one subpackage each): data -> models -> dissection -> viz -> reports.
"""

__version__ = "0.1.0"
