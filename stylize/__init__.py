"""stylize: batch neural style transfer (Gatys, Ecker, Bethge 2015) on VGG19.

The library never imports Prefect; orchestration lives in ``flows/``.
"""

__version__ = "0.1.0"
